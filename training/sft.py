"""The training job: `python -m training.sft <run.yaml>` (or under `accelerate launch -m training.sft`).

Exit codes: 0 trained (or already trained: a finished run is never trained again),
75 (`EXIT_PREEMPTED`) checkpointed on SIGTERM/SIGUSR1 — start it again to resume,
2 invalid configuration, 1 any other failure. Each start resumes from the newest complete
checkpoint in `<run dir>/checkpoints`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import traceback

from launcher.job.config import RunConfig
from launcher.job.errors import ConfigError
from launcher.job.progress import EXIT_PREEMPTED, emit, make_event
from launcher.job.storage import RunPaths, write_json

from .entrypoint import (
    EXIT_CONFIG,
    EXIT_FAILED,
    EXIT_OK,
    input_errors,
    load_run_or_report,
    log,
    scrub,
)
from .hub_files import apply_offline_env, check_prefetched
from .log_noise import quiet_job_logs
from .stop_request import Preempted, StopRequest
from .worker_guard import RunFolderBusy, die_with_parent, hold_rank


def is_main_process() -> bool:
    return int(os.environ.get("RANK", "0")) == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.sft", description="Train one run (QLoRA SFT), resuming from its newest checkpoint."
    )
    parser.add_argument("run_config", help="the run's run.yaml (or its run folder)")
    args = parser.parse_args(argv)
    # First of all, before anything slow: a stop request from here on is never lost
    # (training/stop_request.py), and this worker dies with its parent.
    request = StopRequest().install()
    die_with_parent()
    quiet_job_logs()  # before bitsandbytes, datasets, transformers are imported
    run = load_run_or_report(args.run_config)
    if run is None:
        return EXIT_CONFIG
    apply_offline_env(run)
    paths = RunPaths.of(run)
    if paths.training_completed():
        log(f"run {run.run_id} already completed ({paths.metrics} exists): nothing to train")
        return EXIT_OK
    try:
        hold_rank(paths.root, int(os.environ.get("RANK", "0")))
    except RunFolderBusy as busy:
        print(
            f"error: run {run.run_id} is still being trained by an earlier attempt's process "
            f"({busy}): stop it before starting the run again",
            file=sys.stderr,
        )
        return EXIT_FAILED

    # The launcher's input checks again, before transformers is even imported: a path checked
    # nowhere else (--skip-input-checks) fails in the job's first seconds. The inference files
    # too: the inference job that follows would fail on them only after training.
    errors = input_errors(run, args.run_config, ("model", "dataset", "inference"))
    if errors:
        if is_main_process():
            emit(make_event("error", _latest_step(paths), message="\n".join(errors)), paths.progress, sys.stdout)
        return EXIT_CONFIG
    try:
        check_prefetched(run)  # seconds, before the training stack is imported
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        emit(make_event("error", _latest_step(paths), message=str(exc)), paths.progress, None)
        return EXIT_CONFIG

    from .progress_events import EventWriter

    write = EventWriter(paths.progress, is_main=is_main_process())
    write.record_lost_attempt()
    token = None
    try:
        request.arm()  # a request that came during the checks above stops the job here
        from .preemption import PreemptionCallback

        preemption = PreemptionCallback(request)
        from .model_source import read_hf_token

        token = read_hf_token(run)
        return train(run, paths, write, preemption)
    except Preempted as stop:
        step = _latest_step(paths)
        log(f"got {stop.signal_name} before training started: stopping (resumes from step {step})")
        write("preempted", step, signal=stop.signal_name, launched_at=write.launched_at)
        return EXIT_PREEMPTED
    except ConfigError as exc:
        message = scrub(str(exc), token)
        print(f"error: {message}", file=sys.stderr)
        write("error", _latest_step(paths), message=message)
        return EXIT_CONFIG
    except Exception as exc:  # noqa: BLE001 - the job reports every failure as an event
        print(scrub(traceback.format_exc(), token), file=sys.stderr)
        write("error", _latest_step(paths), message=scrub(f"{type(exc).__name__}: {exc}", token)[:2000])
        return EXIT_FAILED


def _latest_step(paths: RunPaths) -> int:
    from .checkpoints import latest_checkpoint

    latest = latest_checkpoint(paths.checkpoints)
    return latest[0] if latest else 0


def train(run: RunConfig, paths: RunPaths, write, preemption) -> int:
    import torch
    from peft import LoraConfig

    from .arguments import Adjustments, build_sft_config
    from .checkpoints import latest_checkpoint, publish, remove_partial_saves
    from .formatting import build_train_dataset, load_records, split_eval
    from .model_source import load_model, load_tokenizer, resolve_model
    from .progress_events import ProgressCallback
    from .trainer import AtomicCheckpointTrainer, keep_trainable_fp32

    cuda = torch.cuda.is_available()
    adjustments = Adjustments()
    paths.checkpoints.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        for partial in remove_partial_saves(paths.checkpoints):
            log(f"removed an incomplete checkpoint save: {partial.name}")
    latest = latest_checkpoint(paths.checkpoints)
    attempt = write.previous_attempts() + 1
    if run.search.strategy == "asha":
        from .asha import pruned_checkpoint, recorded_prune

        decided = recorded_prune(paths)
        if decided is not None and pruned_checkpoint(paths, decided):
            # asha stopped this run, then it was preempted before it could finish: its adapter is
            # the checkpoint saved at the decision, nothing is trained again.
            return finish_pruned(run, paths, write, decided) if is_main_process() else EXIT_OK
    if is_main_process():
        from .environment_record import record_attempt

        environment = record_attempt(paths, attempt)
        log(
            f"environment: {environment['device']}, cpu {environment['cpu_model']} "
            f"[{' '.join(environment['cpu_flags']) or 'no avx512/amx'}], recorded in attempts/{attempt}/"
        )
    log(
        f"run {run.run_id} attempt {attempt}: "
        + (f"resuming from {latest[1].name}" if latest else "starting from scratch")
        + f" on {'CUDA: ' + torch.cuda.get_device_name(0) if cuda else 'CPU'}"
    )

    source = resolve_model(run)
    tokenizer = load_tokenizer(source)
    records = load_records(run, source.token)
    dataset, answer_only = build_train_dataset(run, tokenizer, records)
    train_data, eval_data = split_eval(run, dataset)
    log("loss: " + ("the answers only (the prompt is context)" if answer_only else "the whole text"))
    if run.train.completion_only_loss is None and answer_only:
        # The plan could not see the columns (format auto, hub dataset), so the id does not record it.
        log(
            "note: answer-only loss was chosen from the dataset's columns here; set dataset.format "
            "(or train.completion_only_loss) in the experiment so the run id records it"
        )
    sft_config = build_sft_config(
        run, str(paths.checkpoints), cuda=cuda, adjustments=adjustments, completion_only_loss=answer_only
    )
    if not cuda and run.quantization.load_in_4bit and run.quantization.bnb_4bit_compute_dtype != "float32":
        adjustments.note(
            f"no CUDA: 4-bit compute dtype {run.quantization.bnb_4bit_compute_dtype} → float32 "
            "(half-precision compute is much slower on CPU)"
        )
    from .levers import apply_allocator_settings

    apply_allocator_settings(run.train, cuda=cuda, adjustments=adjustments)
    for note in adjustments.notes:
        log(note)

    model = load_model(run, source, cuda=cuda)
    model.config.use_cache = False  # incompatible with gradient checkpointing; generation only
    if hasattr(model.config, "pretraining_tp"):
        model.config.pretraining_tp = 1
    lora = run.lora
    peft_config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        task_type="CAUSAL_LM",
    )
    progress = ProgressCallback(write, attempt, latest[0] if latest else None)
    callbacks = [progress, preemption]
    asha = None
    if run.search.strategy == "asha":
        from .asha import make_callback

        asha = make_callback(run, paths, log, is_main_process())
        callbacks.append(asha)
    from .tracking import prepare as prepare_trackers

    trackers = prepare_trackers(run, resumed_from=latest[0] if latest else None, is_main=is_main_process())
    trainer = AtomicCheckpointTrainer(
        model=model,
        args=sft_config,
        train_dataset=train_data,
        eval_dataset=eval_data,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=[*callbacks, *trackers],
    )
    trainer.on_checkpoint = lambda step, path: write("checkpoint", step, path=str(path))
    from transformers import PrinterCallback

    # With disable_tqdm the Trainer prints every log dict as well: each step would be in the log
    # twice (that dict, and the progress event that `qlaunch status` reads). The event is the one.
    trainer.remove_callback(PrinterCallback)
    from .levers import configure_trainer

    offload_line = configure_trainer(trainer, run.train, cuda=cuda, log=log)
    if offload_line:
        log(offload_line)
    from .levers import padding_free_decision
    from .packing import use_packed_rows, use_padding_free

    if use_packed_rows(trainer, model):
        log("packing: rows of max_seq_length tokens, each example attending only to itself")
    flatten, line = padding_free_decision(
        run.train.padding_free,
        packing=bool(sft_config.packing),
        batch_size=sft_config.per_device_train_batch_size,
        max_length=sft_config.max_length,
    )
    if not getattr(trainer, "padding_free", False):  # sft_args.padding_free: trl's own collator
        if flatten:
            use_padding_free(trainer)
        log(line)
    from .example_record import record_path, record_requested

    if record_requested():
        trainer.record_examples_to(record_path(paths.root, int(os.environ.get("RANK", "0"))))
    if not (cuda and sft_config.bf16):
        keep_trainable_fp32(trainer.model)
    if cuda:
        torch.cuda.reset_peak_memory_stats()

    result = trainer.train(resume_from_checkpoint=str(latest[1]) if latest else None)
    state = trainer.state
    if preemption.signum is not None and state.global_step < state.max_steps:
        log(f"stopped by {preemption.signal_name} at step {state.global_step}: start the run again to resume")
        write("preempted", state.global_step, signal=preemption.signal_name)
        return EXIT_PREEMPTED

    pruned = asha.pruned if asha is not None else None
    if pruned is not None:
        from .asha import pruned_metrics

        stopped = pruned_metrics(pruned, run.search.metric)  # the event and metrics.json say the same
        write("pruned", pruned.step, **{k: v for k, v in stopped["pruned"].items() if k != "step"})
    metrics = {
        "run_id": run.run_id,
        "global_step": state.global_step,
        "total_steps": state.max_steps,
        "epoch": state.epoch,
        "train_runtime": round(result.metrics.get("train_runtime", 0.0), 3),
        "train_loss": result.training_loss,
        "train_tokens": int(state.num_input_tokens_seen),  # non-padding, all attempts
        "tokens_per_second": progress.attempt_tokens_per_second(state),  # this attempt
        "attempt": attempt,
        "resumed_from": latest[0] if latest else None,
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "adjustments": adjustments.notes,
    }
    if eval_data is not None:
        metrics["eval_loss"] = (
            _final_eval_loss(trainer) if pruned is None or run.search.metric != "eval_loss" else pruned.value
        )
        if run.search.metric != "eval_loss":  # the asha metric of the saved adapter, as eval_loss is
            metrics[run.search.metric] = pruned.value if pruned is not None else _final_eval(trainer, run.search.metric)
    if pruned is not None:
        metrics.update(stopped)
    if cuda:
        metrics["peak_memory_allocated_bytes"] = torch.cuda.max_memory_allocated()
        metrics["peak_memory_reserved_bytes"] = torch.cuda.max_memory_reserved()

    if is_main_process():
        staging = paths.root / f".tmp-adapter-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        trainer.model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        publish(staging, paths.adapter)
        # metrics.json last: its presence (with adapter/) is what "completed" means.
        write_json(paths.metrics, metrics)
        write("end", state.global_step, total_steps=state.max_steps, status="pruned" if pruned else "completed")
        if pruned is not None and run.tracking.report_to:
            from .tracking import record_pruned

            record_pruned(run, stopped["pruned"], state.global_step)
        log(
            f"done: {state.global_step} steps, loss {metrics['train_loss']:.4f}, "
            f"{metrics['train_runtime']:.1f}s, adapter in {paths.adapter}"
        )
    return EXIT_OK


def finish_pruned(run: RunConfig, paths: RunPaths, write, decision) -> int:
    from .asha import pruned_metrics, publish_pruned_adapter

    publish_pruned_adapter(paths, decision)
    log(
        f"asha stopped this run at rung {decision.rung} (step {decision.step}) before it was preempted: "
        "its adapter is that checkpoint's"
    )
    metrics = {
        "run_id": run.run_id,
        "global_step": decision.step,
        "eval_loss": decision.value,
        **pruned_metrics(decision, run.search.metric),
    }
    write_json(paths.metrics, metrics)
    write("end", decision.step, status="pruned")
    return EXIT_OK


def _final_eval_loss(trainer) -> float | None:
    return _final_eval(trainer, "eval_loss")


def _final_eval(trainer, name: str) -> float | None:
    """An eval metric of the adapter that is saved: from the evaluation the trainer already ran at
    that step (the best one with load_best_model_at_end), else from evaluating now. Evaluating
    the same step twice would log it twice to the trackers."""
    state = trainer.state
    step = state.best_global_step if trainer.args.load_best_model_at_end else state.global_step
    logged = [h[name] for h in state.log_history if name in h and h.get("step") == step]
    if logged and step:
        return logged[-1]
    trainer.evaluate()  # trl's own eval metrics reach only the log line: read it back
    found = [h[name] for h in trainer.state.log_history if name in h]
    return found[-1] if found else None


if __name__ == "__main__":
    sys.exit(main())
