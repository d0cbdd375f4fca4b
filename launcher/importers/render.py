"""An `Imported` as a commented experiment file, or as the `--check` listing."""

from __future__ import annotations

from .core import Imported, yaml_scalar

SECTION_ORDER = ("model", "dataset", "prompt", "quantization", "lora", "train")


def _ordered(imported: Imported):
    def rank(m):
        section = m.key.split(".")[0]
        order = SECTION_ORDER.index(section) if section in SECTION_ORDER else len(SECTION_ORDER)
        return order, len(m.key.split("."))

    return sorted(imported.mapped, key=rank)  # stable: the source's order within a section


def render_experiment(imported: Imported) -> str:
    lines = [
        f"# Imported by `qlaunch import` from {imported.tool}: {imported.origin}",
        "# Every key says where it came from; keys not listed keep qlaunch's defaults.",
    ]
    if imported.warnings:
        lines.append("#")
        lines.append("# Not carried over (warnings):")
        lines.extend(f"#   - {w}" for w in imported.warnings)
    lines.append(f"name: {imported.name}")
    section = sub = None
    for m in _ordered(imported):
        parts = m.key.split(".")
        if parts[0] != section:
            section, sub = parts[0], None
            lines.append("")
            lines.append(f"{section}:")
        if len(parts) == 3:  # train.sft_args.<key>
            if parts[1] != sub:
                sub = parts[1]
                lines.append(f"  {sub}:")
            lines.append(f"    {parts[2]}: {yaml_scalar(m.value)}  # {m.source}")
        else:
            lines.append(f"  {parts[1]}: {yaml_scalar(m.value)}  # {m.source}")
    return "\n".join(lines) + "\n"


def render_check(imported: Imported) -> str:
    width = max((len(m.key) + len(yaml_scalar(m.value)) for m in imported.mapped), default=0) + 3
    lines = [f"{imported.tool}: {imported.origin}", f"mapped ({len(imported.mapped)} keys):"]
    for m in _ordered(imported):
        left = f"{m.key} = {yaml_scalar(m.value)}"
        lines.append(f"  {left:<{width}} <- {m.source}")
    lines.append(f"warnings ({len(imported.warnings)}):")
    lines.extend(f"  - {w}" for w in imported.warnings)
    return "\n".join(lines) + "\n"
