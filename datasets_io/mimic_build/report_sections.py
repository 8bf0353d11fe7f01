"""Step 3's parser: a free-text MIMIC-CXR report -> its sections -> the impression, by the MIMIC-CXR sectioning
convention (MIT-LCP/mimic-cxr txt/section_parser.py): the last IMPRESSION section, else the last FINDINGS section,
else the report's last paragraph."""

from __future__ import annotations

import re

_SECTION_RE = re.compile(r"\n *([A-Z ()/,-]+):\s")
_FINDINGS_LIKE = re.compile(
    r"chest|portable|pa and lat|lateral and pa|ap and lat|lateral and ap|frontal|two views|"
    r"one view|pa view|ap view|lateral view"
)


def normalize_section_name(name: str) -> str:
    """The convention's normalization, condensed: impression/conclusion, findings and view titles are findings."""
    s = name.lower().strip()
    if "impression" in s or s == "conclusion":
        return "impression"
    if "finding" in s or _FINDINGS_LIKE.search(s):
        return "findings"
    return s


def split_sections(text: str) -> list[tuple[str, str]]:
    """[(normalized name, text)] of a MIMIC-CXR report, following MIT-LCP/mimic-cxr txt/section_parser.py:
    a section starts at an upper-case 'NAME:' at a line start; text before the first is the preamble; empty
    impression/findings sections are dropped; a report with neither gets its last paragraph as `last_paragraph`."""
    text = text.replace("\r\n", "\n")
    found = list(_SECTION_RE.finditer(text))
    if not found:
        sections = [("full report", text)]
    else:
        sections = [("preamble", text[: found[0].start(1)])]
        for i, m in enumerate(found):
            end = found[i + 1].start() if i + 1 < len(found) else len(text)
            sections.append((normalize_section_name(m.group(1)), text[m.end() : end]))
    sections = [(n, t) for n, t in sections if not (n in ("impression", "findings") and not t.strip())]
    names = {n for n, _ in sections}
    if "impression" not in names and "findings" not in names:
        paragraphs = [p for p in re.split(r"\n\s*\n", sections[-1][1]) if p.strip()]
        if len(paragraphs) > 1:
            name, _ = sections[-1]
            sections[-1] = (name, "\n\n".join(paragraphs[:-1]))
            sections.append(("last_paragraph", paragraphs[-1]))
    return sections


def clean_text(text: str) -> str:
    """One line, single spaces: a newline inside the impression could start a fake 'ICD:' block in the target."""
    return " ".join(text.split())


def extract_impression(text: str) -> tuple[str | None, str]:
    """(impression, source) where source is impression | findings | last_paragraph | none. The text is usable when
    it has at least one letter once the de-identification placeholders (___) are removed."""
    sections = split_sections(text)
    for source in ("impression", "findings", "last_paragraph"):
        picked = [t for n, t in sections if n == source]
        if picked:
            cleaned = clean_text(picked[-1])
            if re.search(r"[A-Za-z]", cleaned.replace("_", "")):
                return cleaned, source
            return None, "none"
    return None, "none"
