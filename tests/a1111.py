"""An independent reading of the ``parameters`` text the way AUTOMATIC1111 parses it
(``modules/infotext_utils.py``), for tests of what we write."""

from __future__ import annotations

import re

# AUTOMATIC1111 splits the last line with this pattern.
RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """{"Prompt", "Negative prompt", then each ``Key: value`` of the last line}."""
    *lines, last = text.strip().split("\n")
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    out.update(RE_PARAM.findall(last))
    return out
