"""A developer's clone of the sandbox's sample-app source, shared by the end-to-end and fault tests."""

from __future__ import annotations

from pathlib import Path

import git


class SourceClone:
    """A developer's clone of the sample app's source remote."""

    def __init__(self, remote: Path | str, path: Path) -> None:
        self.repo = git.Repo.clone_from(str(remote), path)
        self.path = path
        self.actor = git.Actor("dev", "dev@example.com")

    def commit(self, branch: str, note: str, *, crash: bool = False, healthy: bool = True,
               dockerfile_run: str | None = None) -> str:
        """Push a commit to `branch`: the app settings say `healthy`/`crash`; `dockerfile_run` adds a
        RUN step (a slow or heavy build) right after the COPY."""
        self.repo.remotes.origin.fetch()
        self.repo.git.checkout("-B", branch, f"origin/{branch}")
        settings = self.path / "app" / "settings.env"
        lines = [ln for ln in settings.read_text().splitlines()
                 if not ln.startswith(("HEALTHY=", "CRASH_ON_START=", "# note:"))]
        lines += [f"HEALTHY={'true' if healthy else 'false'}", f"CRASH_ON_START={'true' if crash else 'false'}",
                  f"# note: {note}"]
        settings.write_text("\n".join(lines) + "\n")
        dockerfile = self.path / "Dockerfile"
        text = "\n".join(ln for ln in dockerfile.read_text().splitlines() if "# fault-step" not in ln) + "\n"
        if dockerfile_run:
            text = text.replace("COPY app/ /app/\n", f"COPY app/ /app/\nRUN {dockerfile_run}  # fault-step\n", 1)
        dockerfile.write_text(text)
        self.repo.index.add(["app/settings.env", "Dockerfile"])
        self.repo.index.commit(f"change: {note}", author=self.actor, committer=self.actor)
        self.repo.remotes.origin.push(f"{branch}:{branch}")
        return self.repo.head.commit.hexsha
