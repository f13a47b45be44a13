#!/usr/bin/env bash
# SGLang's own code for the `sglang` test tier, installed where tests can use it and nowhere else:
# the packages of tests/sglang/requirements.txt, --no-deps, into a folder of their own in the cache
# (~/.cache/seedfork/sglang-<version>, or $SEEDFORK_CACHE). The project's .venv is never changed: the tests
# run SGLang in a subprocess of the project's interpreter with that folder first on its path.
# Idempotent: a stamp holds the interpreter and the list it was built from; quick when they match.
set -euo pipefail
cd "$(dirname "$0")/.."

REQ=tests/sglang/requirements.txt
PY=.venv/bin/python
version=$(sed -n 's/^sglang==//p' "$REQ")
dest="${SEEDFORK_CACHE:-$HOME/.cache/seedfork}/sglang-$version"
key="$("$PY" -c 'import sys; print(sys.implementation.cache_tag)') $(sha256sum "$REQ" | cut -d' ' -f1)"
if [ -f "$dest/.installed" ] && [ "$(cat "$dest/.installed")" = "$key" ]; then
  exit 0
fi
echo "installing SGLang $version for the sglang test tier into $dest"
tmp="$dest.tmp.$$"
trap 'rm -rf "$tmp"' EXIT
rm -rf "$tmp"
"$PY" -m pip install -q --no-deps --target "$tmp/site" -r "$REQ"
echo "$key" >"$tmp/.installed"
# Another checkout may build the same folder at the same time: the last complete one wins.
rm -rf "$dest"
mv "$tmp" "$dest"
