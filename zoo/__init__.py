"""medzoo: MedMNIST model zoo: MedAlmighty students, ViT teachers, and the models users load.

>>> import zoo
>>> zoo.list_models("breastmnist")[:2]   # doctest: +SKIP
>>> model = zoo.load("baseline-resnet18-breastmnist")          # doctest: +SKIP
>>> model.predict(images).labels                               # doctest: +SKIP
"""

from zoo.api import NotBuiltError, ZooModel, build, evaluate, list_models, load
from zoo.inference import Prediction
from zoo.registry import ZooEntry, get_entry

__all__ = ["NotBuiltError", "Prediction", "ZooEntry", "ZooModel", "build", "evaluate", "get_entry", "list_models",
           "load"]
