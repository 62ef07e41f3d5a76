"""The engine on a CUDA GPU, with the Triton SGMV kernels, against transformers + PEFT."""

from __future__ import annotations

import gc

import pytest
import torch
import transformers
from engine_utils import greedy, hf_greedy, run_to_completion
from peft import PeftModel

from checkpoints import save_random_adapter, save_tiny_model
from loraplex.adapters_registry import load_adapter_dir
from loraplex.platform import Engine, EngineConfig

pytestmark = pytest.mark.gpu
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpu")
    model = save_tiny_model(
        root / "m", "qwen3", seed=3, hidden_size=128, intermediate_size=256
    )
    specs = {
        "a4": (4, ["q_proj", "v_proj"]),
        "a16": (16, ALL),
        "a8": (8, ["o_proj", "down_proj"]),
    }
    dirs = {
        name: save_random_adapter(model, root / name, rank, targets, seed=i)
        for i, (name, (rank, targets)) in enumerate(specs.items())
    }
    return model, dirs


def engine_for(model, dirs, dtype, **options):
    config = EngineConfig(
        model=str(model),
        dtype=dtype,
        device="cuda",
        max_loras=3,
        max_lora_rank=16,
        block_size=16,
        num_kv_blocks=options.pop("num_kv_blocks", 256),
        **options,
    )
    engine = Engine(config)
    slots = {}
    for slot, (name, path) in enumerate(dirs.items()):
        engine.load_adapter(slot, load_adapter_dir(path, engine.spec, 16))
        slots[name] = slot
    return engine, slots


def plan(slots, max_tokens):
    gen = torch.Generator().manual_seed(5)
    adapters = ["a4", None, "a16", "a8", "a16", "a4", None, "a8"]
    lengths = [70, 5, 33, 129, 12, 48, 90, 3]
    return {
        f"r{i}": (
            torch.randint(0, 256, (n,), generator=gen).tolist(),
            greedy(max_tokens),
            None if a is None else slots[a],
            a,
        )
        for i, (a, n) in enumerate(zip(adapters, lengths, strict=True))
    }


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_fp32_mixed_batch_on_cuda_matches_peft_token_for_token(setup, enforce_eager):
    model, dirs = setup
    engine, slots = engine_for(
        model, dirs, "float32", max_num_batched_tokens=64, enforce_eager=enforce_eager
    )
    assert (engine.runner.decode_graphs is None) == enforce_eager
    assert (
        engine.model.lora_linears()[0]["qkv"].sgmv_backend == "auto"
    )  # Triton on CUDA
    requests = plan(slots, 16)
    got = run_to_completion(engine, {k: v[:3] for k, v in requests.items()})
    base = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    names = list(dirs)
    peft = PeftModel.from_pretrained(base, dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft.load_adapter(dirs[name], adapter_name=name)
    peft = peft.cuda().eval()
    torch.backends.cuda.matmul.allow_tf32 = False
    for rid, (prompt, _, _, adapter) in requests.items():
        if adapter is None:
            with peft.disable_adapter():
                expected = hf_greedy(peft, prompt, 16)
        else:
            peft.set_adapter(adapter)
            expected = hf_greedy(peft, prompt, 16)
        assert got[rid] == expected, (rid, adapter)
    if not enforce_eager:
        assert engine.runner.decode_graphs.num_replays > 0


@pytest.mark.parametrize("enforce_eager", [False, True], ids=["graphs", "eager"])
def test_bf16_on_cuda_agrees_with_fp32(setup, enforce_eager):
    """bf16 runs the same kernels; its greedy tokens mostly follow fp32 (rounding may flip a
    near-tie late in a sequence, so the first tokens are compared)."""
    model, dirs = setup
    runs = []
    for dtype in ("float32", "bfloat16"):
        engine, slots = engine_for(
            model,
            dirs,
            dtype,
            max_num_batched_tokens=64,
            enforce_eager=enforce_eager,
        )
        requests = plan(slots, 4)
        runs.append(run_to_completion(engine, {k: v[:3] for k, v in requests.items()}))
    agree = sum(runs[0][rid][0] == runs[1][rid][0] for rid in runs[0])
    assert agree >= len(runs[0]) - 1


@pytest.mark.parametrize("mixed_graph_max_tokens", [0, 128], ids=["decode", "mixed"])
def test_graphs_give_the_eager_tokens_for_many_requests(setup, mixed_graph_max_tokens):
    """fp32, 40 requests over three adapters and the base: every bucket size up to 40 replays,
    padded, while prefill chunks of long prompts share steps with decodes; with
    mixed_graph_max_tokens those steps replay the graphs of mixed_graphs.py too."""
    model, dirs = setup
    gen = torch.Generator().manual_seed(11)
    names = [None, *dirs]
    runs = []
    for eager in (True, False):
        engine, slots = engine_for(
            model,
            dirs,
            "float32",
            max_num_batched_tokens=128,
            max_num_seqs=40,
            enforce_eager=eager,
            mixed_graph_max_tokens=mixed_graph_max_tokens,
        )
        requests = {}
        for i in range(40):
            length = int(torch.randint(3, 200, (1,), generator=gen))  # + 24 <= 256
            prompt = torch.randint(0, 256, (length,), generator=gen).tolist()
            name = names[i % len(names)]
            requests[f"r{i}"] = (
                prompt,
                greedy(24),
                None if name is None else slots[name],
            )
        gen = torch.Generator().manual_seed(11)
        runs.append(run_to_completion(engine, requests))
        if not eager:
            assert engine.runner.decode_graphs.num_replays > 20
            mixed = engine.runner.mixed_graphs
            assert (mixed is not None) == bool(mixed_graph_max_tokens)
            if mixed is not None:
                assert mixed.num_replays > 5
                assert engine.step_times.steps["prefill"].steps == 0
    assert runs[0] == runs[1]


def test_memory_plan_fills_the_requested_share_of_the_card(setup):
    model, _ = setup
    gc.collect()  # engines of earlier tests must not count as in use
    torch.cuda.empty_cache()
    config = EngineConfig(
        model=str(model),
        dtype="bfloat16",
        device="cuda",
        max_loras=3,
        max_lora_rank=16,
        gpu_memory_utilization=0.3,
    )
    engine = Engine(config)
    plan = engine.runner.memory_plan
    assert plan is not None and plan.num_blocks == engine.kv_cache.num_blocks > 1000
    free, total = torch.cuda.mem_get_info()
    used = total - free
    # The KV cache takes what the plan gave it: the card ends near 30% full, never above.
    assert used <= 0.3 * total + (1 << 30), plan.describe()
    assert used >= 0.2 * total, plan.describe()
    del engine


def test_compiled_fusions_match_the_eager_functions():
    from loraplex.platform.model.fusions import EAGER, compiled_fusions

    fused = compiled_fusions()
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        for tokens in (1, 7, 64, 300):
            x = torch.randn(tokens, 512, device="cuda", generator=gen).to(dtype)
            r = torch.randn(tokens, 512, device="cuda", generator=gen).to(dtype)
            w = torch.randn(512, device="cuda", generator=gen).to(dtype)
            torch.testing.assert_close(
                fused.rms_norm(x, w, 1e-5),
                EAGER.rms_norm(x, w, 1e-5),
                rtol=tol,
                atol=tol,
            )
            for got, want in zip(
                fused.add_rms_norm(x, r, w, 1e-5),
                EAGER.add_rms_norm(x, r, w, 1e-5),
                strict=True,
            ):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
            gu = torch.randn(tokens, 1024, device="cuda", generator=gen).to(dtype)
            torch.testing.assert_close(
                fused.silu_and_mul(gu), EAGER.silu_and_mul(gu), rtol=tol, atol=tol
            )
            q = torch.randn(tokens, 8, 64, device="cuda", generator=gen).to(dtype)
            k = torch.randn(tokens, 2, 64, device="cuda", generator=gen).to(dtype)
            cos = torch.rand(4096, 64, device="cuda", generator=gen)
            sin = torch.rand(4096, 64, device="cuda", generator=gen)
            pos = torch.randint(0, 4096, (tokens,), device="cuda", generator=gen)
            for got, want in zip(
                fused.rotary(pos, q, k, cos, sin),
                EAGER.rotary(pos, q, k, cos, sin),
                strict=True,
            ):
                torch.testing.assert_close(got, want, rtol=tol, atol=tol)
