"""The pinned model zoo: trained weights committed with the repository and shipped in the package
(qbd/zoo/weights/), so every machine evaluates the same models. `pinned`: what is pinned and the manifest that vouches for it;
`build`: trains it; `cli`: the `qbd zoo` command. Getting a model for a job (zoo, store or
training) is qbd.trained's."""


def __getattr__(name: str) -> object:
    # this name was the old module qbd/zoo.py's: say where it went, not just that it is gone (an
    # ImportError, since `from qbd.zoo import get_trained` would turn an AttributeError into a bare one)
    if name in ("get_trained", "TrainedModel"):
        raise ImportError(f"qbd.zoo.{name} moved to qbd.trained.{name} (qbd.zoo is now the pinned zoo's package)")
    raise AttributeError(f"module 'qbd.zoo' has no attribute {name!r}")
