"""The exceptions of both sides: one root, a few children; the CLI prints them as one line each."""


class LauncherError(Exception):
    """Root of every error the CLI reports without a traceback."""


class ConfigError(LauncherError):
    """A spec or an override is invalid. Carries every problem found; its message is one line
    that lists them all: `spec.yaml: 2 problems: a.b: ... | c: ...`."""

    def __init__(self, problems, source=None):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        prefix = f"{source}: " if source else ""
        count = f"{len(self.problems)} problems: " if len(self.problems) > 1 else ""
        super().__init__(prefix + count + " | ".join(self.problems))


class PlanError(LauncherError):
    """The spec is valid but the job cannot run as planned (does not fit, cannot be scheduled)."""


class SubmissionError(LauncherError):
    """Submitting, tracking or stopping a job failed."""


class ClusterError(LauncherError):
    """The cluster is unreachable, or the embedded head cannot start."""


class MissingExtraError(LauncherError):
    """An optional dependency is missing; the message names the install command."""

    def __init__(self, package, extra):
        super().__init__(
            f"{package} is not installed; install it with: pip install 'ftlaunch[{extra}]'"
        )
