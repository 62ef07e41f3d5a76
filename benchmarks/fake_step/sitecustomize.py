"""Loaded by Python at start in bench_api_overhead.py's server only (this folder is put first on
its PYTHONPATH): the model's forward becomes a wait of LORAPLEX_BENCH_FAKE_STEP_MS with the GIL
released, as a GPU step's sync is, returning logits that make token 0 the greedy choice.

Each kernel launch of a real step is a torch call, which drops the GIL and takes it back; when
another thread took it meanwhile, taking it back waits for that thread (up to the interpreter's
switch interval). The fake step makes as many tiny torch calls before waiting out the rest of
the step: LORAPLEX_BENCH_GRAPH_CALLS (default 12: the buffer copies, the replay and the sync of
a decode step from a CUDA graph) or, for a step with a prompt chunk, which runs eagerly,
LORAPLEX_BENCH_EAGER_CALLS (default 650, the launches of an eager Llama-3.1-8B step with LoRA).
A step with a prompt chunk lasts LORAPLEX_BENCH_FAKE_TOKEN_US longer per token it computes
(default 0), so that long prompts make long steps, as on a GPU.

Everything else of the server runs as served: HTTP, admission, the scheduler, sampling, the
output processor, detokenization and the streams. What is measured is then what the serving
layer costs around a GPU step of that length.
"""

import os

_STEP_MS = os.environ.get("LORAPLEX_BENCH_FAKE_STEP_MS")

if _STEP_MS is not None:
    import time

    import torch

    from loraplex.platform import model_runner

    _step_s = float(_STEP_MS) / 1e3
    # A step with a prompt chunk also costs this per token computed (0: steps all alike).
    _token_s = float(os.environ.get("LORAPLEX_BENCH_FAKE_TOKEN_US", "0")) / 1e6
    _graph_calls = int(os.environ.get("LORAPLEX_BENCH_GRAPH_CALLS", "12"))
    _eager_calls = int(os.environ.get("LORAPLEX_BENCH_EAGER_CALLS", "650"))
    _scratch = torch.zeros(4)

    def _forward(self, batch):
        started = time.perf_counter()
        wanted = _step_s
        if all(seq.num_new_tokens == 1 for seq in batch.sequences):
            self.last_step_kind, calls = "decode_graph", _graph_calls
        else:
            self.last_step_kind, calls = "prefill", _eager_calls
            wanted += _token_s * sum(seq.num_new_tokens for seq in batch.sequences)
        for _ in range(calls):
            _scratch.add_(1)  # a launch: drops the GIL and takes it back
        time.sleep(max(0.0, wanted - (time.perf_counter() - started)))
        rows = sum(1 for seq in batch.sequences if seq.samples)
        logits = torch.zeros(rows, self.fake_vocab)
        logits[:, 0] = 1.0
        return logits

    _init = model_runner.ModelRunner.__init__

    def _init_with_vocab(self, model, spec, *args, **kwargs):
        _init(self, model, spec, *args, **kwargs)
        self.fake_vocab = spec.vocab_size

    model_runner.ModelRunner.__init__ = _init_with_vocab
    model_runner.ModelRunner.forward = _forward

    if os.environ.get("LORAPLEX_BENCH_SWITCH_INTERVAL"):
        import sys

        sys.setswitchinterval(float(os.environ["LORAPLEX_BENCH_SWITCH_INTERVAL"]))
