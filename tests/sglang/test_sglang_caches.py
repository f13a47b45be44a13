"""Where SGLang puts what it compiles, against SGLang's own code: everything lands under the directory the
operator renders into an SGLang pod (``contract.engine_cache_env``), which its agent fills from the seed
and serves; and what SGLang keeps there for its own node only is what the agent never packs
(``contract.ENGINE_CACHE_NODE_LOCAL``)."""

from __future__ import annotations

import fnmatch
from pathlib import PurePosixPath

import pytest

from seedfork_api import contract as c

pytestmark = pytest.mark.sglang

ROOT = "/var/cache/seedfork-engine-test"


@pytest.fixture(scope="module")
def caches(tier):
    return tier.run("caches", env=c.engine_cache_env("sglang", ROOT))


def _under_root(path: str) -> bool:
    return PurePosixPath(path).is_relative_to(ROOT)


def test_every_cache_sglang_compiles_into_lies_in_the_pods_engine_cache(caches):
    assert caches["dirs"], caches
    outside = {name: path for name, path in caches["dirs"].items() if not path or not _under_root(path)}
    assert outside == {}, f"SGLang would compile these outside the cache the seed serves: {outside}"
    assert _under_root(caches["sglang_cache_dir"])
    assert caches["torch_compile_base"] == "envs.SGLANG_CACHE_DIR.get()"  # torch.compile's own cache too


def _relative(path: str) -> str:
    return PurePosixPath(path).relative_to(ROOT).as_posix()


def _node_local(rel: str) -> bool:
    return any(fnmatch.fnmatchcase(rel, p) for p in c.ENGINE_CACHE_NODE_LOCAL["sglang"])


def test_what_sglang_keeps_for_its_own_node_is_what_the_agent_never_packs(caches):
    # The P2P probe: a name per set of visible devices, joined to SGLang's cache root.
    assert caches["p2p_root"] == "os.path.expanduser(sglang_envs.SGLANG_CACHE_DIR.get())", caches
    name = caches["p2p_name"].replace("{cuda_visible_devices}", "0,1,2,3")
    assert _node_local(_relative(f"{caches['sglang_cache_dir']}/{name}"))
    # Model files streamed from object storage: weights, which only the verified pull moves.
    streamed = _relative(caches["streamed_model"])
    assert _node_local(f"{streamed}/model-00001-of-00002.safetensors")
    # and none of the compile caches is
    assert not any(_node_local(_relative(f"{path}/k/kernel.bin")) for path in caches["dirs"].values())
