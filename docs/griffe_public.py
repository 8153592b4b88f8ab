"""griffe extension: a public method made as ``name = public("...")(_impl)`` is documented as
the function it is at run time (``functools.wraps`` gives it ``_impl``'s signature and
docstring); read statically, griffe would see an attribute with no docstring."""

from __future__ import annotations

import re
from typing import Any

import griffe

_WRAPPED = re.compile(r"^public\(.*\)\((?P<impl>\w+)\)$", re.DOTALL)


class PublicWrappers(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        for name, member in list(cls.members.items()):
            if not isinstance(member, griffe.Attribute) or member.value is None:
                continue
            found = _WRAPPED.match(str(member.value))
            impl = cls.members.get(found.group("impl")) if found else None
            if not isinstance(impl, griffe.Function):
                continue
            function = griffe.Function(
                name,
                lineno=member.lineno,
                endlineno=member.endlineno,
                parameters=impl.parameters,
                returns=impl.returns,
                docstring=impl.docstring,
            )
            function.labels |= impl.labels
            cls.set_member(name, function)
