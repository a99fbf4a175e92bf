"""Handlers found through the `guestkit_worker.handlers` entry points, by operation."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

from handlers.base import Handler

GROUP = "guestkit_worker.handlers"
log = logging.getLogger("guestkit.registry")


@dataclass
class Registry:
    """Handlers that can run here, and why the others cannot."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)

    @classmethod
    def load(cls, settings: Mapping[str, Any]) -> Registry:
        """Instantiate every registered handler class; record the ones that cannot run here."""
        reg = cls()
        for ep in sorted(entry_points(group=GROUP), key=lambda e: e.name):
            try:
                handler_cls = ep.load()
            except Exception as e:  # a broken plugin must not stop the worker
                log.error("handler entry point %s (%s) failed to load: %s", ep.name, ep.value, e)
                reg.unavailable[ep.name] = f"its plugin {ep.value} failed to load: {e}"
                continue
            reg.add(handler_cls, settings)
        return reg

    def add(self, handler_cls: type[Handler], settings: Mapping[str, Any]) -> None:
        """Register one handler class for each of its operations."""
        reason = handler_cls.unavailable_reason()
        for op in handler_cls.operations:
            if reason:
                self.unavailable.setdefault(op, reason)
            else:
                self.handlers[op] = handler_cls(settings)
                self.unavailable.pop(op, None)

    def get(self, operation: str) -> Handler | None:
        """The handler for `operation`, or None."""
        return self.handlers.get(operation)

    def why_missing(self, operation: str) -> str:
        """A sentence saying why `operation` cannot run here."""
        if operation in self.unavailable:
            return f"operation {operation!r} is not available on this worker: {self.unavailable[operation]}"
        known = ", ".join(sorted(self.handlers)) or "none"
        return f"no handler for operation {operation!r} on this worker (it runs: {known})"

    def capabilities(self) -> set[str]:
        """Operation names plus the extra capabilities the handlers bring."""
        caps = set(self.handlers)
        for h in self.handlers.values():
            caps.update(h.capabilities)
        return caps

    def features(self) -> set[str]:
        """Features the loaded handlers bring."""
        return {f for h in self.handlers.values() for f in h.features}

    def needs_warmth(self, handler: Handler) -> bool:
        """True for a handler whose jobs fork from the warm zygote: it has a real `prepare()`,
        or it validates its payload with a model (pydantic), which the lean forker of plain
        jobs does not import: it would nearly double the forker, and every fork and exit
        costs in proportion to the forker's memory."""
        kind = type(handler)
        own_validate = kind.validate is not Handler.validate and not kind.plain_validate
        return kind.prepare is not Handler.prepare or own_validate or handler.payload_model is not None

    def warm_handlers(self) -> list[Handler]:
        """The handlers (each once) whose jobs start from a pre-imported process."""
        unique = {id(h): h for h in self.handlers.values()}.values()
        return [h for h in unique if self.needs_warmth(h)]

    def describe(self) -> list[dict[str, Any]]:
        """One entry per operation: handler, payload types, availability."""
        out: list[dict[str, Any]] = [
            {
                "operation": op,
                "handler": h.name,
                "payload_types": list(h.payload_types),
                "needs_network": h.needs_network,
                "available": True,
            }
            for op, h in sorted(self.handlers.items())
        ]
        out += [
            {"operation": op, "available": False, "reason": why}
            for op, why in sorted(self.unavailable.items())
        ]
        return out
