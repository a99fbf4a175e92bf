"""What guestkit.inspect and guestkit.profile share: roots, validation, warm-up, readable inputs."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

from pydantic import BaseModel

from handlers.base import Handler
from handlers.guestkit_image import (
    anchored_settings,
    chain_paths,
    check_image_spec,
    dissect_missing,
    output_root,
    warm_up,
)
from handlers.guestkit_output import report_destination

#: Containers and filesystems the image reader handles, as constraint capabilities.
GUESTKIT_CAPABILITIES = ("disk.qcow2", "disk.raw", "disk.vmdk", "disk.vhd", "disk.vhdx",
                         "disk.vdi", "fs.ext2", "fs.ext3", "fs.ext4", "fs.xfs", "fs.vfat",
                         "fs.btrfs", "partition.gpt", "partition.mbr")


class GuestImageHandler(Handler):
    """A handler that opens one guest disk image read-only; subclasses set the payload model."""

    payload_model: ClassVar[type[BaseModel] | None] = None
    capabilities = GUESTKIT_CAPABILITIES
    features = ("lvm", "selinux", "apparmor")

    def __init__(self, settings: Mapping[str, Any]) -> None:
        """Keep the settings with the image roots and output dir made absolute now."""
        super().__init__(anchored_settings(settings))

    @classmethod
    def unavailable_reason(cls) -> str | None:
        """Unavailable without the guestkit extra (dissect.target)."""
        return dissect_missing(cls.operations[0])

    def validate(self, data: Any) -> Any:
        """Check the payload, the image against the roots and any output destination."""
        assert self.payload_model is not None
        payload = self.payload_model.model_validate(data)
        real = check_image_spec(payload.image, self.settings)  # type: ignore[attr-defined]
        output = getattr(payload, "output", None)
        if output and output.destination:
            report_destination(output.destination, output_root(self.settings), real)
        return payload

    def prepare(self) -> None:
        """Pre-import the image library so forked jobs start warm."""
        warm_up()

    def input_paths(self, payload: Any) -> list[str]:
        """The image file and its backing chain: the only files outside its dirs a job reads."""
        return chain_paths(payload.image, self.settings)
