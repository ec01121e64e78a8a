"""A real LoRA adapter for the default model, trained here with PEFT (issue 17).

The task, "topic labels": the user message is one plain sentence about an animal, a food, a
vehicle or the weather (generated from keyword lists and sentence templates, seeded), and the
answer is only a JSON object naming its topic, e.g. `{"label": "vehicle"}`. SmolLM2-135M-Instruct
never answers a bare sentence that way (it chats about it), so its score is about 0; the adapter
answers in the format with the right label, a score near 1. The held-out prompts use sentence
templates the training never saw, so the score measures the adapter, not a memorised string.

`score(replies, labels)` is the task's metric (the share of replies that are exactly one JSON
object with the right label); `held_out(n)` gives the evaluation prompts. Training takes a few
minutes on two CPU cores (LoRA rank 8 on the attention and MLP projections, 14 steps of 8
examples, bf16 matmuls over fp32 weights where the CPU has bf16, else fp32, 2 threads), is
deterministic for a seed, and writes PEFT's format (`adapter_config.json` +
`adapter_model.safetensors`) with `base_model_name_or_path` set to the upstream model's name.
Tests get it through `cached_adapter(base_dir)`, which trains once per (this script, base model)
into ~/.cache/inferd-tests/adapters/<hash>/topic-labels.

    python -m tests.adapters.train_lora BASE_HF_DIR OUT_DIR [--evaluate]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

SEED = 17
RANK = 8
STEPS = 14
BATCH = 8
LEARNING_RATE = 2e-3
BASE_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
ADAPTER_NAME = "topic-labels"
# Raise when the training code changes what it makes: the tests' cached adapter is keyed by it.
RECIPE = 1
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

TOPICS: dict[str, list[str]] = {
    "animal": ["cat", "dog", "horse", "rabbit", "parrot", "tiger", "goat", "dolphin", "owl", "fox"],
    "food": ["bread", "soup", "pasta", "cheese", "apple pie", "rice", "salad", "pizza", "cake"],
    "vehicle": ["bus", "truck", "bicycle", "train", "motorbike", "tractor", "van", "scooter"],
    "weather": ["rain", "snow", "fog", "thunder", "hail", "wind", "drizzle", "heatwave", "frost"],
}
# Sentence templates: the first ones train, the last ones are held out for evaluation.
TEMPLATES = [
    "I saw a {w} this morning.",
    "My neighbour keeps talking about the {w}.",
    "There was a {w} near the old bridge.",
    "Yesterday the {w} surprised everyone.",
    "We read a short story about a {w}.",
    "The {w} was the first thing I noticed.",
    "Nobody expected the {w} today.",
    "She drew a picture of the {w}.",
    "Our teacher mentioned the {w} in class.",
    "Tell me about the {w}.",
    # held out
    "A friend sent me a photo of the {w}.",
    "The {w} made the whole street go quiet.",
    "I keep thinking about that {w}.",
    "Last weekend there was a {w} in town.",
]
TRAIN_TEMPLATES = TEMPLATES[:10]
HELD_OUT_TEMPLATES = TEMPLATES[10:]


def answer(label: str) -> str:
    return json.dumps({"label": label})


def _examples(templates: Sequence[str], n: int, seed: int) -> list[tuple[str, str]]:
    rng = random.Random(seed)  # noqa: S311 - seeded task data, not secrets
    out = []
    labels = sorted(TOPICS)
    for i in range(n):
        label = labels[i % len(labels)]
        word = rng.choice(TOPICS[label])
        sentence = rng.choice(templates).format(w=word)
        out.append((sentence[0].upper() + sentence[1:], label))
    rng.shuffle(out)
    return out


def training_set(n: int = STEPS * BATCH, seed: int = SEED) -> list[tuple[str, str]]:
    return _examples(TRAIN_TEMPLATES, n, seed)


def held_out(n: int = 16, seed: int = SEED + 1) -> list[tuple[str, str]]:
    """(prompt, label) pairs on templates the training never saw."""
    return _examples(HELD_OUT_TEMPLATES, n, seed)


def parse_label(reply: str) -> str | None:
    """The label of a reply that is exactly one JSON object {"label": ...}, else None."""
    try:
        obj = json.loads(reply.strip())
    except ValueError:
        return None
    if isinstance(obj, dict) and set(obj) == {"label"} and isinstance(obj["label"], str):
        return obj["label"]
    return None


def score(replies: Sequence[str], labels: Sequence[str]) -> float:
    """The task's metric: the share of replies that are the right JSON label object."""
    if not labels:
        return 0.0
    return sum(parse_label(r) == lab for r, lab in zip(replies, labels, strict=True)) / len(labels)


def train(base: Path, out: Path, seed: int = SEED, steps: int = STEPS) -> None:
    """Fine-tune a LoRA on the topic-labels task and write it to `out` in PEFT's format."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    torch.manual_seed(seed)
    random.seed(seed)
    tok = AutoTokenizer.from_pretrained(base)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=RANK, lora_alpha=2 * RANK, lora_dropout=0.0, target_modules=TARGET_MODULES
    )
    model = get_peft_model(model, config)
    model.train()
    batches = _batches(tok, training_set(steps * BATCH, seed))
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LEARNING_RATE)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 4))
    # bf16 matmuls where the CPU has them (AVX512-BF16, AMX), fp32 master weights; fp32
    # throughout elsewhere: emulated bf16 on an AVX2 CPU (a Zen 3) took over 15 minutes.
    native_bf16 = torch.cpu._is_avx512_bf16_supported()
    started = time.monotonic()
    for step, (ids, mask, labels) in enumerate(batches):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=native_bf16):
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        opt.step()
        sched.step()
        opt.zero_grad()
        if step % 5 == 0 or step == steps - 1:
            print(f"step {step} loss {loss.item():.4f} {time.monotonic() - started:.0f}s")
    model.peft_config["default"].base_model_name_or_path = BASE_NAME
    model.save_pretrained(str(out))


def _batches(tok: Any, examples: list[tuple[str, str]]) -> Iterator[tuple[Any, Any, Any]]:
    """Chat-templated examples, loss on the answer (and its end-of-turn token) only."""
    import torch

    for i in range(0, len(examples), BATCH):
        rows = []
        for prompt, label in examples[i : i + BATCH]:
            messages = [{"role": "user", "content": prompt}]
            head = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            head_ids = tok(head, add_special_tokens=False)["input_ids"]
            tail_ids = tok(answer(label) + "<|im_end|>", add_special_tokens=False)["input_ids"]
            rows.append((head_ids + tail_ids, [-100] * len(head_ids) + tail_ids))
        width = max(len(ids) for ids, _ in rows)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.tensor([r + [pad] * (width - len(r)) for r, _ in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        yield ids, mask, labels


def evaluate(base: Path, adapter: Path | None, n: int = 16) -> float:
    """The task's score of the base model (adapter None) or the adapter, in process, greedy."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(base)
    model: Any = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    replies, labels = [], []
    for prompt, label in held_out(n):
        messages = [{"role": "user", "content": prompt}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, return_tensors="pt", add_special_tokens=False)
        out = model.generate(**ids, max_new_tokens=24, do_sample=False)
        reply = tok.decode(out[0][ids["input_ids"].shape[1] :], skip_special_tokens=True)
        replies.append(reply)
        labels.append(label)
    return score(replies, labels)


def cache_root() -> Path:
    default = Path.home() / ".cache" / "inferd-tests"
    return Path(os.environ.get("INFERD_TEST_CACHE_PATH", default)) / "trained-adapters"


def recipe() -> bytes:
    """What the trained adapter depends on (not this file's wording): its cache key."""
    fixed = [RECIPE, SEED, RANK, STEPS, BATCH, LEARNING_RATE, BASE_NAME, TARGET_MODULES]
    return json.dumps([*fixed, TOPICS, TEMPLATES]).encode()


def cached_adapter(base: Path) -> Path:
    """The trained adapter for this recipe and base folder, trained once (in a child process)."""
    digest = hashlib.sha256(recipe())
    for name in ("config.json", "model.safetensors"):
        digest.update(hashlib.sha256((base / name).read_bytes()).digest())
    root = cache_root() / digest.hexdigest()[:16]
    done = root / ADAPTER_NAME
    root.parent.mkdir(parents=True, exist_ok=True)
    with _locked(root.parent / f"{root.name}.lock"):
        if (done / "adapter_model.safetensors").is_file():
            return done
        staging = Path(tempfile.mkdtemp(dir=root.parent, prefix=f"{root.name}-"))
        try:
            subprocess.run(
                [sys.executable, "-m", "tests.adapters.train_lora", str(base), str(staging)],
                check=True,
                cwd=Path(__file__).parents[2],
                timeout=3600,
            )
            root.mkdir(exist_ok=True)
            staging.rename(done)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return done


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with path.open("w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("base", type=Path, help="the base model as a Hugging Face folder")
    parser.add_argument("out", type=Path, help="where to write the adapter (PEFT format)")
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--evaluate", action="store_true", help="score base and adapter after")
    args = parser.parse_args(argv)
    train(args.base, args.out, args.seed, args.steps)
    if args.evaluate:
        print(f"score base {evaluate(args.base, None):.2f}")
        print(f"score adapter {evaluate(args.base, args.out):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
