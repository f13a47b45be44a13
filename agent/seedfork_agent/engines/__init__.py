"""Engine adapters: how verified weights get into a serving engine.

- ``llama`` / ``reference``: seedfork's own small demo and test engine (a real Llama-architecture model) that
  attaches to the agent's weight store without copying.
- ``sglang``: renders and supervises SGLang's R-Fork launch (SGLang moves its own bytes).
- ``ipc``: the checkpoint-engine ZMQ/IPC handoff into an engine started with dummy weights (vLLM, SGLang).
"""
