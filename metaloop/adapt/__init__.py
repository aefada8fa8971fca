"""Per-domain adaptation: one standalone text classifier per target domain.

    params = AdaptParams(strategy="lora")
    result = adapt_domain("artifacts/meta/model", table, "hospitality", params, "artifacts/adapted/hospitality")
    outcome = adapt_domains(init, table, ["hospitality", "veterinary_clinic"], params, "artifacts/adapted")

The starting point is any encoder folder (the meta-learned initialisation exported by
`metaloop.train`, `packaged:all-MiniLM-L6-v2`, a hub id) or an existing classifier folder.
The output folder loads with `AutoModelForSequenceClassification.from_pretrained` alone:
config with `id2label`/`label2id` (labels in sorted order, as in the evaluation episodes),
`model.safetensors`, tokenizer files, and `metaloop.json` recording how it was made.

Strategies (`AdaptParams.strategy`): `full` trains every weight; `top_k` the top k
Transformer layers and the head; `head` the pooler and classifier only; `lora` peft LoRA
adapters (plus pooler and classifier), merged into the weights after training, so the
saved model has the base architecture and no peft dependency.

* Head initialisation: class centroids c_k of the training examples' pooled features give
  W_k = 2 c_k, b_k = -||c_k||^2 (the Proto-MAML head, as in `metaloop.meta.head`): before
  any step the classifier is a nearest-centroid classifier, a strong start for few shots.
* Meta-SGD: an init folder carrying `meta_sgd_lrs.safetensors` (written by
  `metaloop.meta.checkpoint.export_model`; keys are the encoder's parameter names, plus
  `head.weight` [d] and `head.bias` []) has those parameters trained by SGD with the learned
  per-element step sizes (times `learned_lr_scale`); other trainable parameters use AdamW.
  `inner_lrs.safetensors` is read too, with the same keys. A `lora_adapter/` folder beside
  the init (meta-learned LoRA A matrices) initialises the LoRA adapters.
* Early stopping: the domain's `val` rows, else a stratified `holdout_fraction` of its train
  rows, provided that slice has at least `early_stopping_min_rows` rows; the best epoch's
  weights are kept.

The standalone classifier pools with the architecture's own head (BERT: [CLS] -> dense ->
tanh), because transformers has no stock BERT classifier with mean pooling; meta-training
pools by mean. Fine-tuning bridges the two; see docs/compression.md.

Rooms, by what changes together:

| module        | what it holds                                                           |
|---------------|-------------------------------------------------------------------------|
| `data`        | a domain's rows: `Examples`, `DomainData`, `domain_data`                |
| `torch_state` | torch's RNG and thread count, one block at a time: `seeded`             |
| `features`    | tokenising, pooled features, the prototype head, scoring               |
| `folder`      | an init loaded for classification; a classifier saved as a folder       |
| `trainable`   | which parameters train: strategies, LoRA, learned learning rates       |
| `fit`         | the fitting loop, schedules, early stopping, soups                      |
| `domains`     | one domain or many, end to end: `adapt_domain`, `adapt_domains`         |
"""

from __future__ import annotations

from metaloop.adapt.data import DomainData, Examples, domain_data, eval_labels_by_domain
from metaloop.adapt.domains import AdaptOutcome, AdaptResult, adapt_domain, adapt_domains
from metaloop.adapt.features import (
    accuracy, batches, centroid_accuracy, encode, layers_of, pooled_features, predict_logits, prototype_init,
)
from metaloop.adapt.fit import FitHistory, fit, linear_schedule, mean_weights
from metaloop.adapt.folder import SIDECAR, load_for_classification, save_classifier
from metaloop.adapt.torch_state import seeded, torch_threads
from metaloop.stage_params import AdaptParams

__all__ = [
    "AdaptOutcome", "AdaptParams", "AdaptResult", "DomainData", "Examples", "FitHistory", "SIDECAR", "accuracy",
    "adapt_domain", "adapt_domains", "batches", "centroid_accuracy", "domain_data", "encode", "eval_labels_by_domain",
    "fit", "layers_of", "linear_schedule", "load_for_classification", "mean_weights", "pooled_features",
    "predict_logits", "prototype_init",
    "save_classifier", "seeded", "torch_threads",
]
