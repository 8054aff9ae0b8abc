"""The one training entry point: a stage of the release's recipe run by the Hugging Face Trainer.

Distributed runs (torchrun, DeepSpeed, FSDP) are the Trainer's / Accelerate's; this module only builds
the model, the data and the arguments, keeps checkpoints safe to resume from, and writes a complete
`from_pretrained` folder at the end.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any

import torch
from transformers import BertConfig
from transformers.trainer_callback import TrainerCallback

from med2e3 import stopping
from med2e3.config import Med2E3Config
from med2e3.data.datasets import Example
from med2e3.data.processor import IGNORE_INDEX, Med2E3Processor, load_tokenizer
from med2e3.errors import ConfigError, DatasetError, Interrupted, TrainingInterrupted
from med2e3.files import write_atomic
from med2e3.folders import check_model_folder, named_folder
from med2e3.model import Med2E3ForConditionalGeneration
from med2e3.release import (
    ReleaseError,
    add_image_token,
    fit_llm_tokenizer,
    load_pretrained_weights,
    read_llm_folder,
)
from med2e3.training.config import ModelSection, TrainConfig, config_to_dict
from med2e3.training.data import Collator, VolumeCache, VolumeTextDataset, load_examples
from med2e3.training.runs import (
    COMPLETE_MARKER,
    LOSS_LOG,
    TRAINING_INFO,
    discard_run,
    last_complete_checkpoint,
    preflight,
    record_settings,
    rotate_checkpoints,
)

__all__ = ["COMPLETE_MARKER", "LOSS_LOG", "TRAINING_INFO", "build_model", "last_complete_checkpoint", "train"]


# ---- model ----------------------------------------------------------------------------------------
def build_model(config: TrainConfig) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor]:
    """A preset model (random init, or with the pretrained parts the config names) or a med2e3 model
    folder, with its processor."""
    section = config.model
    if section.init_from:
        folder = check_model_folder(section.init_from, role="model.init_from")
        model = Med2E3ForConditionalGeneration.from_pretrained(folder)
        processor = Med2E3Processor.from_pretrained(folder)
        if section.reinit_question_encoder:
            reinit_question_encoder(model, config.seed, folder)
        if section.slice_aggregation not in (None, model.config.slice_aggregation):
            raise ConfigError(
                f"model.slice_aggregation={section.slice_aggregation!r} but {section.init_from} was trained "
                f"with {model.config.slice_aggregation!r}"
            )
    elif not section.preset:
        raise ConfigError("model: set preset or init_from")
    else:
        try:
            model, processor = preset_model(section, config.seed)
        except ReleaseError as err:  # a part's folder named by the config
            raise ConfigError(str(err)) from err
    processor.max_length = config.max_length
    processor.check_config(model.config)
    processor.window = config.data.window  # checked with the config; the preprocessing travels with the model
    orientations = Counter(source.orientation for source in config.data.train)
    processor.orientation = orientations.most_common(1)[0][0]
    return model, processor


def preset_model(section: ModelSection, seed: int) -> tuple[Med2E3ForConditionalGeneration, Med2E3Processor]:
    """The section's preset, randomly initialised (``seed``) but for the pretrained LLM and question encoder
    it names; an LLM with its own tokenizer brings its config and vocabulary (`fit_llm_tokenizer`)."""
    overrides = dict(section.overrides)
    if section.slice_aggregation:
        overrides["slice_aggregation"] = section.slice_aggregation
    question_folder = named_folder(section.question_encoder) if section.question_encoder else None
    question_tokenizer = None
    if question_folder:
        overrides["question_encoder_config"] = BertConfig.from_pretrained(question_folder)
        question_tokenizer = load_tokenizer(question_folder)
    llm_folder = named_folder(section.language_model) if section.language_model else None
    tokenizer = None
    if llm_folder:
        text_config, tokenizer = read_llm_folder(llm_folder)
        if tokenizer is not None:  # else the preset's tokenizer, whose shape preflight checked the LLM has
            fit_llm_tokenizer(tokenizer, text_config, llm_folder)
            overrides["text_config"] = text_config
            overrides["image_token_id"] = add_image_token(tokenizer, text_config.vocab_size, where=llm_folder)
    torch.manual_seed(seed)
    model = Med2E3ForConditionalGeneration(Med2E3Config.from_preset(section.preset, **overrides))
    processor = Med2E3Processor.for_config(
        model.config, question_tokenizer=question_tokenizer, tokenizer=tokenizer
    )
    if llm_folder:
        load_pretrained_weights(model.language_model, llm_folder)
    if question_folder and hasattr(model, "question_encoder"):  # mean / none: no question encoder
        load_pretrained_weights(model.question_encoder, question_folder)
    return model, processor


def reinit_question_encoder(model: Med2E3ForConditionalGeneration, seed: int, folder: Path) -> None:
    """Random (seeded) weights for the TG-IS question encoder and its text projection."""
    if not hasattr(model, "question_encoder"):
        raise ConfigError(
            f"{folder}: model.reinit_question_encoder, but this model has no TG-IS question encoder"
        )
    torch.manual_seed(seed)  # a new module: init on loaded weights is skipped once they count as initialised
    encoder = model.question_encoder
    encoder.load_state_dict(type(encoder)(encoder.config).state_dict())
    model.tgis.text_proj.reset_parameters()


def answer_mean_loss(outputs: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy averaged over each answer's tokens, then over the answers (``loss_average: answer``).

    The Trainer calls it per micro-batch and does not divide by gradient-accumulation steps when a loss
    function is given; `_AnswerMeanLoss` does.
    """
    logits = outputs.logits[:, :-1].float()
    target = labels[:, 1:].to(logits.device)
    tokens = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="none"
    )
    counts = (target != IGNORE_INDEX).sum(1)
    answered = counts > 0
    per_answer = tokens.sum(1)[answered] / counts[answered]
    return per_answer.mean() if answered.any() else tokens.sum() * 0.0


class _AnswerMeanLoss:
    """`answer_mean_loss` divided by the gradient-accumulation steps, as the Trainer expects."""

    def __init__(self, grad_accum: int):
        self.grad_accum = grad_accum

    def __call__(self, outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
        return answer_mean_loss(outputs, labels) / self.grad_accum


def relevant_slice_loss(scores: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """Mean of -log(score mass on the relevant slices) over the rows whose mask selects some but not all
    slices (B x S scores and mask); 0 (with a graph) when no row does."""
    relevant = relevant.to(scores.device)
    rows = relevant.any(1) & ~relevant.all(1)
    mass = (scores.float() * relevant).sum(1)[rows]
    return -mass.clamp(1e-6, 1.0).log().mean() if rows.any() else scores.sum() * 0.0


def check_slice_loss(examples: list[Example], config: Med2E3Config) -> None:
    """Before training with the relevant-slice loss: the model has TG-IS, and some example lists relevant
    slices, all within the model's slices."""
    if config.slice_aggregation != "tgis":
        raise ConfigError(
            f"slice_loss_weight trains TG-IS, but the model's slice_aggregation is {config.slice_aggregation!r}"
        )
    num_slices = config.num_slices
    listed = [ex for ex in examples if ex.relevant_slices]
    if not listed:
        raise ConfigError("slice_loss_weight > 0, but no example of data.train lists relevant slices")
    for ex in listed:
        if max(ex.relevant_slices) >= num_slices:
            raise DatasetError(
                ex.volume,
                f"example {ex.id!r}: relevant slice {max(ex.relevant_slices)} is outside the model's "
                f"{num_slices} slices",
            )


def apply_lora(model: Med2E3ForConditionalGeneration, config: TrainConfig) -> None:
    """Wrap the LLM with PEFT LoRA adapters (its base weights frozen)."""
    from peft import LoraConfig, get_peft_model

    lora = config.lora
    model.language_model.requires_grad_(False)
    model.language_model = get_peft_model(
        model.language_model,
        LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
        ),
    )


def _trainer_class(slice_loss_weight: float) -> type:
    """The Trainer, plus ``slice_loss_weight`` x `relevant_slice_loss` on the TG-IS scores in training."""
    from transformers import Trainer

    if not slice_loss_weight:
        return Trainer

    class SliceLossTrainer(Trainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            relevant = inputs.pop("relevant_slices")
            loss, outputs = super().compute_loss(
                model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch
            )
            if model.training and outputs.slice_scores is not None and outputs.slice_scores.requires_grad:
                extra = slice_loss_weight * relevant_slice_loss(outputs.slice_scores, relevant)
                # the same footing as the answer loss: the Trainer divides an unscaled loss by the steps
                scaled = self.compute_loss_func is not None or (
                    self.model_accepts_loss_kwargs and num_items_in_batch is not None
                )
                loss = loss + (extra / self.current_gradient_accumulation_steps if scaled else extra)
            return (loss, outputs) if return_outputs else loss

    return SliceLossTrainer


# ---- checkpoints ----------------------------------------------------------------------------------
class CheckpointCallback(TrainerCallback):
    """After each checkpoint save: add the processor files and the completion marker (written last), then
    delete the complete checkpoints beyond ``keep`` (never before the new one is complete)."""

    def __init__(self, processor: Med2E3Processor, keep: int | None):
        self.processor = processor
        self.keep = keep

    def on_save(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                self.processor.save_pretrained(folder)
                write_atomic(folder / COMPLETE_MARKER, f"{state.global_step}\n")
                rotate_checkpoints(Path(args.output_dir), self.keep)


class SaveOnSignal(TrainerCallback):
    """After each optimiser step: when a stop was requested (`med2e3.stopping`; on any rank), save a
    checkpoint and stop, every rank at the same step. ``signum``: the request's signal, once stopped."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def on_step_end(self, args, state, control, **kwargs):
        signum = stopping.requested() or 0
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            flag = torch.tensor(float(signum), device=args.device)
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            signum = int(flag.item())
        if signum:
            self.signum = signum
            control.should_save = control.should_training_stop = True


class EpochCallback(TrainerCallback):
    """Tells the dataset the epoch, so augmentation is a function of (seed, epoch, index) and resumable."""

    def __init__(self, dataset: VolumeTextDataset):
        self.dataset = dataset

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.dataset.epoch = int(state.epoch or 0)


class CsvLossLog(TrainerCallback):
    """Appends every log record (step, epoch, loss, lr, grad norm, ...) to ``loss_log.csv``."""

    fields = ("step", "epoch", "loss", "eval_loss", "learning_rate", "grad_norm")

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOSS_LOG

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.is_file():
            return
        with self.path.open() as f:  # a resumed run drops rows logged after its checkpoint
            rows = [r for r in csv.DictReader(f) if int(r["step"]) <= state.global_step]
        self._write(rows, mode="w")

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {k: logs[k] for k in self.fields[2:] if k in (logs or {})}
        if state.is_world_process_zero and values:
            self._write(
                [{"step": state.global_step, "epoch": round(state.epoch or 0, 4), **values}], mode="a"
            )

    def _write(self, rows: list[dict[str, Any]], mode: str) -> None:
        new = mode == "w" or not self.path.is_file()
        with self.path.open(mode, newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.fields)
            if new:
                writer.writeheader()
            writer.writerows(rows)


# ---- entry point ----------------------------------------------------------------------------------
def training_arguments(config: TrainConfig) -> Any:
    """The Trainer's arguments (checkpoint rotation is `CheckpointCallback`'s, not the Trainer's)."""
    from transformers import TrainingArguments

    on_gpu = torch.cuda.is_available()
    return TrainingArguments(
        output_dir=config.output_dir,
        seed=config.seed,
        data_seed=config.seed,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        learning_rate=config.lr,
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.scheduler,
        warmup_steps=config.warmup_ratio,
        max_grad_norm=config.max_grad_norm,
        bf16=config.precision == "bf16",
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,
        eval_strategy="steps" if config.data.eval and config.eval_steps else "no",
        eval_steps=config.eval_steps,
        report_to=["tensorboard"] if "tensorboard" in config.report_to else "none",
        deepspeed=config.deepspeed,
        fsdp=config.fsdp or "",
        fsdp_config=config.fsdp_config,
        dataloader_num_workers=config.data.num_workers,
        remove_unused_columns=False,
        label_names=["labels"],
        ddp_find_unused_parameters=False,
        ddp_backend=None if on_gpu or int(os.environ.get("WORLD_SIZE", "1")) == 1 else "gloo",
        use_cpu=not on_gpu,
        optim="adamw_torch",
        # the token count across processes scales the Trainer's loss; an answer mean is already a mean
        average_tokens_across_devices=config.loss_average == "token",
    )


def train(config: TrainConfig, overwrite: bool = False) -> Path:
    """Run one stage; return the output folder (a complete `from_pretrained` model with its processor).

    Everything is checked before any folder is created (`preflight`). A folder holding a run with the same
    result settings resumes it from its last complete checkpoint, or is returned as is when that run
    finished; other settings raise ConfigError naming the keys. ``overwrite`` discards the old run first.
    """
    output_dir = Path(config.output_dir)
    if preflight(config, overwrite):
        return output_dir
    from transformers import set_seed  # where a run starts: a refused run never pays for it

    examples = load_examples(config.data.train, config.data.on_error)
    eval_examples = load_examples(config.data.eval, config.data.on_error) if config.data.eval else []
    set_seed(config.seed)
    model, processor = build_model(config)
    model.set_training_stage(
        config.stage,
        train_vision2d=config.train_vision2d,
        train_question_encoder=config.train_question_encoder,
        train_vision3d=config.train_vision3d,
    )
    if config.lora.enabled:
        apply_lora(model, config)
    if config.slice_loss_weight:
        check_slice_loss(examples, model.config)
    size = tuple(model.config.vision3d_config.image_size)
    cache = VolumeCache(config.data.cache_dir, size, config.data.window)
    train_set = VolumeTextDataset(examples, cache, augment=config.data.augment, seed=config.seed)
    eval_set = VolumeTextDataset(eval_examples, cache) if eval_examples else None
    callbacks: list[TrainerCallback] = [
        CheckpointCallback(processor, config.save_total_limit),
        EpochCallback(train_set),
    ]
    if "csv" in config.report_to:
        callbacks.append(CsvLossLog(output_dir))
    trainer = _trainer_class(config.slice_loss_weight)(
        model=model,
        args=training_arguments(config),
        train_dataset=train_set,
        eval_dataset=eval_set,
        data_collator=Collator(processor, model.config.num_slices if config.slice_loss_weight else None),
        callbacks=callbacks,
        compute_loss_func=_AnswerMeanLoss(config.grad_accum) if config.loss_average == "answer" else None,
    )
    resume = _start_run(config, overwrite) if trainer.is_world_process_zero() else None
    resume = _broadcast_path(resume)
    stopper = SaveOnSignal()
    trainer.add_callback(stopper)
    with stopping.stop_on_signals():
        if stopping.requested():  # e.g. an ablation worker asked to stop between two stages
            raise Interrupted(stopping.requested(), f"stopped before training {output_dir}")
        result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
        if stopper.signum and trainer.state.global_step < trainer.state.max_steps:
            raise TrainingInterrupted(stopper.signum, output_dir / f"checkpoint-{trainer.state.global_step}")
        if trainer.is_world_process_zero():
            _save_final(trainer, processor, config, result.training_loss, resume)
    return output_dir


def _save_final(
    trainer: Any, processor: Med2E3Processor, config: TrainConfig, loss: float, resume: Path | None
) -> None:
    """Rank 0: the trained model (LoRA merged), its processor, and `TRAINING_INFO` last (marks completion)."""
    output_dir = Path(config.output_dir)
    final = trainer.model
    if config.lora.enabled:
        final.language_model = final.language_model.merge_and_unload()
    final.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    info = {
        "stage": config.stage,
        "global_step": trainer.state.global_step,
        "train_loss": loss,
        "resumed_from": None if resume is None else resume.name,
        "config": config_to_dict(config),
    }
    write_atomic(output_dir / TRAINING_INFO, json.dumps(info, indent=2) + "\n")


def _start_run(config: TrainConfig, overwrite: bool) -> Path | None:
    """Rank 0: discard an old run when asked, record the settings, return the checkpoint to resume from."""
    output_dir = Path(config.output_dir)
    if overwrite:
        discard_run(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    record_settings(config)
    return last_complete_checkpoint(output_dir)


def _broadcast_path(path: Path | None) -> Path | None:
    """Rank 0 decides which checkpoint to resume from; every rank uses the same one."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return path
    box = [None if path is None else str(path)]
    torch.distributed.broadcast_object_list(box, src=0)
    return None if box[0] is None else Path(box[0])
