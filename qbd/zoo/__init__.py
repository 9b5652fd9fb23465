"""The pinned model zoo: trained weights committed with the repository (fixtures/zoo/), so every
machine evaluates the same models. `pinned`: what is pinned and the manifest that vouches for it;
`build`: trains it; `cli`: the `qbd zoo` command. Getting a model for a job (zoo, store or
training) is qbd.trained's."""
