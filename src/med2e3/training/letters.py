"""Stage 0 of the tiny preset: teach its language model to answer a multiple-choice question by letter.

A closed question ends with ``Choices: A. ... B. ... C. ... D. ...`` and its answer starts with the
letter of the chosen option. Picking ``B`` because the right text stands after ``B.`` is an in-context
lookup that a pretrained LLM brings with it and that a two-layer LLM trained from scratch learns only
after about 1,500 steps of 32 sequences. This stage teaches that lookup from text alone: no volume and
no image token; the option lists are those of the closed questions of a synthetic benchmark generated
with its own seed (`CHOICES_SEED`, none of the demo's), shuffled, and the question names the option.
The result is a causal-LM folder that ``model.language_model`` of a training config loads into the
tiny preset; the package ships one (``language_model: bundled:tiny_llm``), made by::

    python -m med2e3.training.letters --output-dir src/med2e3/assets/tiny_llm
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from med2e3.config import Med2E3Config
from med2e3.data.datasets import ANSWER_LETTERS as LETTERS
from med2e3.data.datasets import closed_choices, closed_prompt
from med2e3.data.processor import IGNORE_INDEX, Med2E3Processor
from med2e3.files import write_atomic

#: Seed of the synthetic benchmark whose choice lists stage 0 reads (the demo and the tests use others).
CHOICES_SEED = 1000


def benchmark_choices(volumes: int = 100, seed: int = CHOICES_SEED) -> list[list[str]]:
    """The option texts of every closed question of a freshly generated synthetic benchmark (text only)."""
    from med2e3.data.synth import benchmark_examples, generate_benchmark

    with tempfile.TemporaryDirectory(prefix="med2e3-letters-") as root:
        generate_benchmark(root, volumes, seed=seed, progress=False)
        closed = [
            ex
            for split in ("train", "validation", "test")
            for ex in benchmark_examples(root, "vqa", split, "closed")
        ]
    return [closed_choices(ex.prompt) for ex in closed]


def lookup_example(rng: random.Random, choice_lists: list[list[str]]) -> tuple[str, str]:
    """(user turn, answer): ``"Find: <text>. Choices: A. ... D. ..."`` answered ``"<letter>. <text>"``.

    The options are one closed question's, shuffled; the text to find is one of them, drawn at random.
    """
    options = rng.sample(rng.choice(choice_lists), 4)
    pick = rng.randrange(4)
    return closed_prompt(f"Find: {options[pick]}.", options), f"{LETTERS[pick]}. {options[pick]}"


class LookupDataset(torch.utils.data.Dataset):
    """``size`` lookup sequences in the chat template, without the image; item ``i`` depends on (seed, i)."""

    def __init__(self, processor: Med2E3Processor, choice_lists: list[list[str]], size: int, seed: int):
        self.processor = processor
        self.choice_lists = choice_lists
        self.size = size
        self.seed = seed

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict[str, Any]:
        text, answer = lookup_example(random.Random(self.seed * 1_000_003 + index), self.choice_lists)
        return {**self.encode(text, answer), "letter": answer[0]}

    def encode(self, text: str, answer: str) -> dict[str, list[int]]:
        proc = self.processor
        prompt = proc.tokenizer(proc.prompt(text).replace(proc.image_token, ""), add_special_tokens=False)[
            "input_ids"
        ]
        target = proc._answer_ids(answer)
        return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}


def collate(rows: list[dict[str, Any]], processor: Med2E3Processor) -> dict[str, torch.Tensor]:
    """Right-padded batch of `LookupDataset` items (the processor's padding)."""
    return processor._pad([(r["input_ids"], r["labels"]) for r in rows], "right", with_labels=True)


@torch.no_grad()
def lookup_accuracy(
    llm: torch.nn.Module,
    processor: Med2E3Processor,
    choice_lists: list[list[str]],
    n: int = 512,
    seed: int = 10_007,
) -> float:
    """Share of ``n`` fresh lookup questions whose first answer token is the right letter."""
    data = LookupDataset(processor, choice_lists, n, seed)
    letter_ids = [processor._answer_ids(f"{letter}. x")[0] for letter in LETTERS]
    llm.eval()
    hits = 0
    for start in range(0, n, 64):
        rows = [data[i] for i in range(start, min(n, start + 64))]
        batch = collate(rows, processor)
        logits = llm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        first = (batch["labels"] != IGNORE_INDEX).int().argmax(1) - 1  # position that predicts the letter
        picked = logits[torch.arange(len(rows)), first][:, letter_ids].argmax(-1)
        hits += sum(LETTERS[p] == r["letter"] for p, r in zip(picked.tolist(), rows, strict=True))
    return hits / n


def train_letters(output_dir: Path, steps: int, batch_size: int, lr: float, seed: int) -> dict[str, Any]:
    """Train the tiny preset's LLM on lookup sequences with the Trainer; save it with a record of the run."""
    from transformers import AutoModelForCausalLM, Trainer, TrainingArguments, set_seed

    set_seed(seed)
    config = Med2E3Config.from_preset("tiny")
    processor = Med2E3Processor.for_config(config)
    llm = AutoModelForCausalLM.from_config(config.text_config)
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="med2e3-letters-"),  # nothing is saved there (save_strategy no)
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant_with_warmup",
        warmup_steps=50,
        weight_decay=0.0,
        logging_steps=100,
        save_strategy="no",
        report_to="none",
        use_cpu=not torch.cuda.is_available(),
        seed=seed,
        data_seed=seed,
        remove_unused_columns=False,
    )
    choice_lists = benchmark_choices()
    data = LookupDataset(processor, choice_lists, steps * batch_size, seed)
    start = time.time()
    Trainer(
        model=llm, args=args, train_dataset=data, data_collator=lambda rows: collate(rows, processor)
    ).train()
    seconds = round(time.time() - start, 1)
    llm.save_pretrained(output_dir)  # saved before anything else can fail
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "seed": seed,
        "seconds": seconds,
        "threads": torch.get_num_threads(),
        "choices": f"closed questions of a {CHOICES_SEED}-seed synthetic benchmark of 100 volumes",
        "lookup_accuracy": lookup_accuracy(llm, processor, choice_lists),
    }
    write_atomic(output_dir / "letters_run.json", json.dumps(record, indent=2) + "\n")
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=2500)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    record = train_letters(args.output_dir, args.steps, args.batch_size, args.lr, args.seed)
    print(json.dumps(record))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
