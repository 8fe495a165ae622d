"""Package discovery only; everything else is in pyproject.toml.

Every package under peft_ctx/ ships (a new method's folder needs no edit here), and so do the card templates, which
live at the top level (hub_cards/) and install as peft_ctx/hub_cards.
"""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["peft_ctx", "peft_ctx.*"]), "peft_ctx.hub_cards"],
    package_dir={"peft_ctx.hub_cards": "hub_cards"},
)
