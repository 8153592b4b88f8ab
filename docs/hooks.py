"""mkdocs hook: the README's in-page links work on the guide pages too.

The guides are README.md's sections, pulled in by pymdownx.snippets, so a README link such
as ``[Host sessions](#host-sessions)`` may land on a page that lacks that heading. After the
snippets are in, such links become autorefs references (``[Host sessions][host-sessions]``),
which mkdocs-autorefs resolves to whichever page has the heading; with ``strict``, a link
to a heading no page has fails the build.
"""

from __future__ import annotations

import re
from typing import Any

from markdown import Extension, Markdown
from markdown.preprocessors import Preprocessor

_IN_PAGE_LINK = re.compile(r"\]\(#([\w-]+)\)")
_AFTER_SNIPPETS = 31
"""Preprocessor priority: pymdownx.snippets runs at 32 (higher runs first)."""


class _ReadmeLinks(Preprocessor):
    def run(self, lines: list[str]) -> list[str]:
        return [_IN_PAGE_LINK.sub(r"][\1]", line) for line in lines]


class _ReadmeLinksExtension(Extension):
    def extendMarkdown(self, md: Markdown) -> None:
        md.preprocessors.register(_ReadmeLinks(md), "sessionq_readme_links", _AFTER_SNIPPETS)


def on_config(config: Any) -> Any:
    config.markdown_extensions.append(_ReadmeLinksExtension())
    return config
