"""Dataset → trl's dataset shapes in the run's prompt template.

Whole-text loss gives one `text` column; answer-only loss (`train.completion_only_loss`, see
launcher/job/loss.py) gives `prompt` + `completion` columns, both rendered in the template, so trl's
SFTTrainer tokenises prompt+completion and leaves the prompt's tokens out of the loss itself.
The prompt is rendered by the same function inference uses, so it is exactly what the model is
asked later. No tokenizer chat template has to mark assistant turns (trl's `assistant_only_loss`
needs `{% generation %}` markers, which neither Llama 2's format nor most chat templates have):
the mask is the rendered prompt. In a multi-turn conversation the last answer is the completion
and the earlier turns are context.

Rows come in three shapes (`dataset.format`, auto-detected by default):
  text         a ready `text` column, used as it is (e.g. mlabonne/guanaco-llama2-1k, which is
               already in the Llama 2 format);
  instruction  instruction (+ optional input) and response columns;
  messages     a chat `messages` column (list of {role, content}).
Templates (`prompt.template`):
  llama2         `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`, the
                 format of Meta's Llama 2 reference code (no <<SYS>> block without a system prompt;
                 one `<s>[INST] … [/INST] … </s>` per turn);
  chat_template  the tokenizer's own chat template;
  none           only for `text` rows.
Training and inference format prompts with the same functions, so what the model is asked at
inference matches what it was trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable

from launcher.job.config import RunConfig
from launcher.job.data_files import LOCAL_FORMATS
from launcher.job.errors import ConfigError
from launcher.job.hub import pin_for, snapshot_dir
from launcher.job.loss import answer_only
from launcher.job.run_checks import auto_format, dataset_file, needed_fields

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
LLAMA2_BOS, LLAMA2_EOS = "<s>", "</s>"


@dataclass(frozen=True)
class Turn:
    user: str
    answer: str | None  # None: the model is to answer (a prompt)


# --- Llama 2 ------------------------------------------------------------------------------------


def llama2_text(turns: list[Turn], system: str | None = None) -> str:
    """The Llama 2 chat format, as Meta's reference `chat_completion` builds it.

    The system prompt goes inside the first [INST]; each answered turn is
    `<s>[INST] {user} [/INST] {answer} </s>`; an unanswered last turn is `<s>[INST] {user} [/INST]`.
    """
    parts = []
    for index, turn in enumerate(turns):
        user = turn.user
        if index == 0 and system:
            user = B_SYS + system + E_SYS + user
        if turn.answer is None:
            if index != len(turns) - 1:
                raise ValueError("only the last turn may be unanswered")
            parts.append(f"{LLAMA2_BOS}{B_INST} {user.strip()} {E_INST}")
        else:
            parts.append(f"{LLAMA2_BOS}{B_INST} {user.strip()} {E_INST} {turn.answer.strip()} {LLAMA2_EOS}")
    return "".join(parts)


# --- rows → turns -------------------------------------------------------------------------------


def detect_format(run: RunConfig, columns: Iterable[str]) -> str:
    columns = set(columns)
    ds = run.dataset
    if ds.format != "auto":
        missing = [c for c in needed_fields(ds, ds.format).values() if c not in columns]
        if missing:
            raise ConfigError(
                f"dataset.format: {ds.format!r} needs column(s) {missing} (the dataset has: {sorted(columns)})"
            )
        return ds.format
    fmt = auto_format(ds, columns)
    if fmt is None:
        raise ConfigError(
            f"dataset.path: cannot tell the dataset's format from its columns {sorted(columns)}: expected "
            f"{ds.text_field!r}, {ds.messages_field!r}, or {ds.instruction_field!r} + {ds.response_field!r} "
            "(set dataset.format and the *_field keys)"
        )
    return fmt


def instruction_turn(run: RunConfig, row: dict[str, Any]) -> tuple[str | None, Turn]:
    ds = run.dataset
    user = str(row[ds.instruction_field]).strip()
    if ds.input_field and row.get(ds.input_field):
        user = f"{user}\n\n{str(row[ds.input_field]).strip()}"
    system = (row.get(ds.system_field) if ds.system_field else None) or run.prompt.system_prompt
    return system, Turn(user, str(row[ds.response_field]))


# ShareGPT's {from, value} messages (Axolotl's `sharegpt` type) read as {role, content}.
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}


def _as_role_content(message: Any) -> Any:
    if isinstance(message, dict) and "role" not in message and "from" in message:
        return {"role": SHAREGPT_ROLES.get(message["from"], message["from"]), "content": message.get("value", "")}
    return message


def message_turns(
    messages: list[dict[str, Any]], default_system: str | None, where: str
) -> tuple[str | None, list[Turn]]:
    """A conversation as (system, turns); roles must alternate user/assistant."""
    if not isinstance(messages, list) or not messages:
        raise ConfigError(f"{where}: expected a non-empty list of {{role, content}} messages")
    messages = [_as_role_content(m) for m in messages]
    system = default_system
    rest = list(messages)
    if rest[0].get("role") == "system":
        system = str(rest.pop(0).get("content", ""))
    turns: list[Turn] = []
    for index in range(0, len(rest), 2):
        user, answer = rest[index], rest[index + 1] if index + 1 < len(rest) else None
        if user.get("role") != "user" or (answer is not None and answer.get("role") != "assistant"):
            roles = [m.get("role") for m in messages]
            raise ConfigError(f"{where}: roles must alternate user/assistant after an optional system, got {roles}")
        turns.append(Turn(str(user.get("content", "")), None if answer is None else str(answer.get("content", ""))))
    return system, turns


# --- turns → text -------------------------------------------------------------------------------


def render(run: RunConfig, tokenizer, system: str | None, turns: list[Turn]) -> str:
    """Training text (all turns answered) or a prompt (last turn unanswered) in the run's template."""
    template = run.prompt.template
    if template == "llama2":
        return llama2_text(turns, system)
    if template == "chat_template":
        if getattr(tokenizer, "chat_template", None) is None:
            raise ConfigError(
                "prompt.template: 'chat_template' but the tokenizer has no chat template "
                "(use 'llama2', or a model/tokenizer that ships one)"
            )
        messages = [{"role": "system", "content": system}] if system else []
        for turn in turns:
            messages.append({"role": "user", "content": turn.user})
            if turn.answer is not None:
                messages.append({"role": "assistant", "content": turn.answer})
        prompt = turns[-1].answer is None
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=prompt)
        eos = tokenizer.eos_token
        if not prompt and eos and text.rstrip().endswith(eos):
            # Ending on EOS itself keeps trl from appending a second one after the newline.
            text = text.rstrip()
        return text
    raise ConfigError("prompt.template: 'none' only works with a ready text column (dataset.format: text)")


def row_turns(run: RunConfig, row: dict[str, Any], fmt: str, where: str) -> tuple[str | None, list[Turn]]:
    """An instruction or messages row as (system, answered turns)."""
    if fmt == "instruction":
        system, turn = instruction_turn(run, row)
        return system, [turn]
    system, turns = message_turns(row[run.dataset.messages_field], run.prompt.system_prompt, where)
    if turns[-1].answer is None:
        raise ConfigError(f"{where}: the last message must be the assistant's answer")
    return system, turns


def format_row(run: RunConfig, tokenizer, row: dict[str, Any], fmt: str, where: str = "dataset row") -> str:
    if fmt == "text":
        return str(row[run.dataset.text_field])
    system, turns = row_turns(run, row, fmt, where)
    return render(run, tokenizer, system, turns)


def prompt_and_completion(
    run: RunConfig, tokenizer, row: dict[str, Any], fmt: str, where: str = "dataset row"
) -> tuple[str, str]:
    """(prompt, completion) whose concatenation is the row's training text: the prompt is what
    inference asks (the last turn unanswered), the completion the last answer."""
    system, turns = row_turns(run, row, fmt, where)
    full = render(run, tokenizer, system, turns)
    asked = render(run, tokenizer, system, [*turns[:-1], Turn(turns[-1].user, None)])
    # A template may render the open prompt a little differently from the same prefix of the
    # whole conversation; the completion then starts where the two part.
    cut = 0
    for a, b in zip(asked, full):
        if a != b:
            break
        cut += 1
    return full[:cut], full[cut:]


def format_prompt(run: RunConfig, tokenizer, prompt: str, system: str | None = None) -> str:
    """An inference prompt in the same template the run trained with."""
    system = system or run.prompt.system_prompt
    if run.prompt.template == "none":
        return prompt
    return render(run, tokenizer, system, [Turn(prompt, None)])


# --- tokenizer details --------------------------------------------------------------------------


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts BOS in front by itself (Llama's does; SmolLM2's does not)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bool(with_special)
        and with_special[0] == bos
        and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]
    )


def without_leading_bos(text: str, tokenizer) -> str:
    """Drop a BOS the text starts with when the tokenizer adds its own: never two BOS tokens."""
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and adds_bos(tokenizer):
        return text[len(bos) :]
    return text


# --- loading ------------------------------------------------------------------------------------


def load_records(run: RunConfig, token: str | None = None):
    """The dataset split as a `datasets.Dataset` (hub id or a local jsonl/json/csv/parquet file)."""
    import datasets

    ds = run.dataset
    local = dataset_file(run)  # None: a hub id (the launcher's input check uses the same rule)
    try:
        if local is not None and local.is_file():
            kind = LOCAL_FORMATS.get(local.suffix.lower())
            if kind is None:
                raise ConfigError(
                    f"dataset.path: {local}: unsupported file type {local.suffix!r} (use {', '.join(LOCAL_FORMATS)})"
                )
            data = datasets.load_dataset(kind, data_files=str(local), split=ds.split)
        elif local is not None:
            raise ConfigError(f"dataset.path: no such file {local}")
        elif (pin := pin_for(run, "dataset.path")) is not None:
            # Prefetched: the pinned commit's files, from the shared cache (offline-safe: the
            # same data-file and README-config rules as the hub repo itself).
            data = datasets.load_dataset(str(snapshot_dir(run, pin)), split=ds.split)
        else:
            data = datasets.load_dataset(ds.path, split=ds.split, token=token, revision=ds.revision)
    except ConfigError:
        raise
    except ValueError as exc:
        if "split" in str(exc).lower():
            raise ConfigError(f"dataset.split: {ds.split!r}: {exc}") from None
        raise
    if len(data) == 0:
        raise ConfigError(f"dataset.path: {ds.path} has no rows in split {ds.split!r}")
    if ds.max_samples is not None:
        data = data.select(range(min(ds.max_samples, len(data))))
    return data


def build_train_dataset(run: RunConfig, tokenizer, data):
    """(dataset, answer_only): rows mapped to only a `text` column (whole-text loss) or only
    `prompt` + `completion` columns (answer-only loss); any other column would change how trl
    reads the dataset."""
    fmt = detect_format(run, data.column_names)
    if run.prompt.template == "none" and fmt != "text":
        raise ConfigError(
            f"prompt.template: 'none' uses a ready text column, but the dataset is in the {fmt!r} format "
            "(use 'llama2' or 'chat_template')"
        )
    only_answers = answer_only(run.train, fmt)

    def to_text(row, index):
        text = format_row(run, tokenizer, row, fmt, where=f"dataset row {index}")
        return {"text": without_leading_bos(text, tokenizer)}

    def to_prompt_completion(row, index):
        prompt, completion = prompt_and_completion(run, tokenizer, row, fmt, where=f"dataset row {index}")
        return {"prompt": without_leading_bos(prompt, tokenizer), "completion": completion}

    mapped = data.map(
        to_prompt_completion if only_answers else to_text,
        with_indices=True,
        remove_columns=data.column_names,
        desc="Formatting",
    )
    return mapped, only_answers


def build_text_dataset(run: RunConfig, tokenizer, data):
    """Rows as one `text` column each: prompt and answer together (whole-text loss)."""
    run = run.model_copy(update={"train": run.train.model_copy(update={"completion_only_loss": False})})
    return build_train_dataset(run, tokenizer, data)[0]


def split_eval(run: RunConfig, data):
    """(train, eval or None) per dataset.test_size (a fraction below 1, or a count)."""
    size = run.dataset.test_size
    if not size:
        return data, None
    test_size = int(size) if size >= 1 else size
    if (isinstance(test_size, int) and test_size >= len(data)) or len(data) < 2:
        raise ConfigError(f"dataset.test_size: {size} leaves no training rows ({len(data)} rows)")
    parts = data.train_test_split(test_size=test_size, seed=run.dataset.seed)
    return parts["train"], parts["test"]
