"""What a provisioning command did, and what the operator must do next."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Outcome:
    summary: str  # one line: what changed
    next_steps: tuple[str, ...] = ()  # what the operator must do (copy, reload, ...)

    def render(self) -> str:
        lines = [self.summary]
        if self.next_steps:
            lines.append("next:")
            lines += [f"  {i}. {step}" for i, step in enumerate(self.next_steps, 1)]
        return "\n".join(lines)


def reload_step(state_install_dir: str, files: str) -> str:
    return (
        f"copy {files} into {state_install_dir} on the broker host and reload Mosquitto: "
        "`systemctl reload mosquitto` or `kill -HUP <pid>` (ACL and CRL are re-read; "
        "connections of revoked nodes lose every right at once)"
    )
