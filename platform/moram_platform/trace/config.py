"""The ``trace:`` section of a job config (benchmark: trace), declared by the benchmark: how
prompts and answers are cut to tokens (``tokenize.py`` applies it, DESIGN.md Data).

These keys lived in ``data:`` before; a config that still sets them there is refused with a line
naming the new key (``RENAMED_KEYS``), so an old config never trains with a silently default cap.
"""
from __future__ import annotations

from pydantic import Field

from ..sections import AtLeastOne, Bool, NonEmptyStr, Section

# old key -> its place now; config_from_dict refuses the old ones (Benchmark.renamed_keys)
RENAMED_KEYS = {f"data.{key}": f"trace.{key}" for key in ("max_prompt_tokens", "long_prompt_tasks",
                                                           "max_answer_tokens")}


class TraceSection(Section):
    """TRACE specifics: the token budgets of prompts and answers."""

    max_prompt_tokens: AtLeastOne = Field(1024, description="prompts are truncated (from the left) to this many "
                                                            "tokens")
    long_prompt_tasks: dict[NonEmptyStr, AtLeastOne] = Field(
        default_factory=lambda: {"MeetingBank": 4096}, description="task -> its own max_prompt_tokens")
    max_answer_tokens: AtLeastOne = Field(512, description="training answers are truncated to this many tokens")
    pack_training: Bool = Field(True, description="training micro-batches packed into as few rows as hold them, each "
                                                  "example attending only to itself: the padded batch's loss and "
                                                  "gradients (to float rounding) for less compute; false: padded rows")
