"""The printed form shared by the objects a config builds (priors, perturbations, transforms,
training terms): the class and the settings it was built with, so logs and ``repr`` read like
the YAML that made them."""


class SettingsRepr:
    """``Name(setting=value, ...)`` from the public attributes; private state (a memory of codes,
    say) is not part of what the object is."""

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({settings})"
