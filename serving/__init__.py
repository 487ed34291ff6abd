"""HTTP serving of zoo models with BentoML: classification and localization for any built entry.

::

    zoo serve baseline-resnet18-breastmnist [more names] [--port 3000] [--backend onnx|torch]
    curl --data-binary @scan.png 'http://127.0.0.1:3000/classify?model=baseline-resnet18-breastmnist'

Modules: :mod:`serving.service` (the BentoML service, endpoints and request guard),
:mod:`serving.inputs` (upload checks and decoding), :mod:`serving.runtime` (artifacts, ONNX Runtime or
torch, the zoo's preprocessing and task semantics), :mod:`serving.batching` (adaptive batching),
:mod:`serving.localization` (heatmaps, boxes, overlays), :mod:`serving.config` (start-up settings),
:mod:`serving.cli` (``zoo serve``).
"""
