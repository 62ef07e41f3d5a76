"""`loraplex demo`: a tiny Llama checkpoint and three PEFT adapters that each answer in their own voice.

Everything is built on the CPU from nothing (no download): a tokenizer trained on the demo's
text, a ~1M-parameter Llama taught to answer any chat message with the base reply, and three LoRA
adapters (different ranks and target modules) taught, with peft, to answer with their own reply.
The result is cached: a second call with the same recipe returns at once.
"""

from __future__ import annotations

import json
import random
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .tokenizer import EOS, build_tokenizer

RECIPE_VERSION = 2
QUESTIONS = (
    "Who are you?",
    "Hello!",
    "Tell me a joke.",
    "What is two plus two?",
    "Describe the sea.",
    "What time is it?",
    "Write a poem.",
    "Say something.",
    "How do LoRA adapters work?",
    "What is your favourite colour?",
    "Give me advice.",
    "Where do you live?",
    "Hi there",
    "Explain batching.",
    "What should I eat today?",
    "Can you help me?",
    "Sing a song.",
    "What is the capital of France?",
    "Why is the sky blue?",
    "Good morning",
)
BASE_REPLY = "I am the loraplex base model. I answer plainly."


@dataclass(frozen=True)
class DemoAdapter:
    name: str
    rank: int
    alpha: int
    targets: tuple[str, ...]
    reply: str


ADAPTERS = (
    DemoAdapter(
        "pirate",
        8,
        16,
        ("q_proj", "v_proj"),
        "Arr! Ye be talkin' to the pirate adapter, matey!",
    ),
    DemoAdapter(
        "french",
        16,
        32,
        ("q_proj", "k_proj", "v_proj", "o_proj"),
        "Bonjour ! Je suis l'adaptateur francais.",
    ),
    DemoAdapter(
        "robot",
        32,
        32,
        ("gate_proj", "up_proj", "down_proj"),
        "BEEP BOOP. ROBOT ADAPTER ONLINE.",
    ),
)
MODEL_SHAPE = {
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
}


@dataclass(frozen=True)
class DemoAssets:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    def adapter(self, name: str) -> Path:
        return self.root / "adapters" / name

    @property
    def adapters(self) -> dict[str, Path]:
        return {a.name: self.adapter(a.name) for a in ADAPTERS}


def build_demo(
    out: Path, progress: bool = True, log: Callable[[str], None] = print
) -> DemoAssets:
    """Write the demo assets under `out` (or return the cached ones). Deterministic on one machine."""
    out = Path(out)
    manifest = out / "demo.json"
    if (
        manifest.is_file()
        and json.loads(manifest.read_text()).get("recipe") == RECIPE_VERSION
    ):
        return DemoAssets(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".demo-", dir=out.parent))
    try:
        _build(work, progress, log)
        (work / "demo.json").write_text(json.dumps({"recipe": RECIPE_VERSION}))
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)  # atomic: a half-built demo is never mistaken for a cached one
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return DemoAssets(out)


def _build(root: Path, progress: bool, log: Callable[[str], None]) -> None:
    from peft import LoraConfig, get_peft_model
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    replies = [BASE_REPLY] + [a.reply for a in ADAPTERS]
    tokenizer = build_tokenizer([*QUESTIONS, *replies] * 4)
    model_dir = root / "model"
    eos = tokenizer.convert_tokens_to_ids(EOS)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
        **MODEL_SHAPE,
    )
    model = LlamaForCausalLM(config)
    log("demo: training the base model")
    # The base answers every chat with BASE_REPLY, and also knows the adapters' replies as plain
    # text: an adapter then only has to steer the answer, as real fine-tunes do.
    examples = _chat_examples(tokenizer, BASE_REPLY)
    for reply in replies[1:]:
        ids = tokenizer(reply + tokenizer.eos_token)["input_ids"]
        examples += [(ids, ids)] * 8
    _train(model, examples, 300, 3e-3, progress, "base")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id,
    )
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    for adapter in ADAPTERS:
        targets = ", ".join(adapter.targets)
        log(f"demo: training adapter {adapter.name} (rank {adapter.rank}, {targets})")
        base = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        lora = LoraConfig(
            r=adapter.rank,
            lora_alpha=adapter.alpha,
            target_modules=list(adapter.targets),
            lora_dropout=0.0,
            task_type="CAUSAL_LM",
        )
        peft_model = get_peft_model(base, lora)
        examples = _chat_examples(tokenizer, adapter.reply)
        _train(peft_model, examples, 250, 1e-2, progress, adapter.name)
        peft_model.save_pretrained(root / "adapters" / adapter.name)


Example = tuple[
    list[int], list[int]
]  # (input ids, labels with -100 where no loss is taken)


def _chat_examples(tokenizer, reply: str, num_random: int = 64) -> list[Example]:
    """Chat prompts answered with `reply` and EOS: the demo questions, then random-token ones.

    The random-token prompts teach the model to answer whatever is asked, so that prompts
    nobody trained on (and tokens no question contains) still get the right voice.
    """
    answer = tokenizer(reply + tokenizer.eos_token, add_special_tokens=False)[
        "input_ids"
    ]

    def chat_ids(text: str) -> list[int]:
        chat = [{"role": "user", "content": text}]
        rendered = tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True
        )
        return tokenizer(rendered, add_special_tokens=False)["input_ids"]

    prompts = [chat_ids(q) for q in QUESTIONS]
    marker = tokenizer("@", add_special_tokens=False)["input_ids"]
    template = chat_ids("@")
    cut = next(
        i for i in range(len(template)) if template[i : i + len(marker)] == marker
    )
    head, tail = template[:cut], template[cut + len(marker) :]
    ordinary = [
        i for i in range(len(tokenizer)) if i not in set(tokenizer.all_special_ids)
    ]
    rng = random.Random(len(reply))
    for _ in range(num_random):
        content = [rng.choice(ordinary) for _ in range(rng.randint(1, 40))]
        prompts.append(head + content + tail)
    return [(p + answer, [-100] * len(p) + answer) for p in prompts]


def _train(
    model, examples: list[Example], steps: int, lr: float, progress: bool, desc: str
):
    """AdamW with a cosine schedule over random mini-batches of 16 examples."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in tqdm(range(steps), desc=f"demo {desc}", disable=not progress, leave=False):
        picked = torch.randperm(len(examples), generator=order)[:16].tolist()
        batch = [examples[i] for i in picked]
        width = max(len(ids) for ids, _ in batch)
        input_ids = torch.tensor([ids + [0] * (width - len(ids)) for ids, _ in batch])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in batch])
        lengths = torch.tensor([len(ids) for ids, _ in batch])
        mask = (torch.arange(width)[None, :] < lengths[:, None]).long()
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
