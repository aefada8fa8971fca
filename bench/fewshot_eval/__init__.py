"""Few-shot evaluation of an initialisation on fixed evaluation episodes.

The pieces `bench/fewshot.py` is built from (benchmark-only: nothing in `metaloop/` imports
them), usable on their own:

    cache = EmbeddingCache(encoder, tokenizer, max_length=64)
    centroids = params.meta.centroids()                  # ProtoNet's classifier (metric, names)
    method = FrozenCentroid(cache, centroids)            # no training at all
    method = CentroidHeadFit(cache, centroids, steps=50) # the prototypes fitted as a head
    method = Finetune(model, tokenizer, FinetuneParams(), pooling="mean")
    method = MetaLearnerMethod(learner, tokenizer)        # a meta-learner's own adaptation
    scores = score_episodes("finetune", method, episodes, pool.texts)
    summary = summarise(scores)                           # {shots: Summary(mean, ci95, n, sd)}

Every method sees an episode (support rows with class indices, query rows) and returns the
fraction of its queries classified correctly. All of them work on the same sentence
embedding the meta-learners train: the backbone's hidden states pooled by
`metaloop.meta.pooling` (mean by default), with the prototype-initialised linear head of
`metaloop.meta.head` (W_k = 2 c_k, b_k = -||c_k||^2). So:

* `FrozenCentroid` is the ProtoNet classifier of the frozen encoder: a
  `metaloop.meta.head.Centroids` (squared Euclidean or cosine distance to the class means of
  the support embeddings, the class names optionally counted as support rows).
  It equals `ProtoNet.evaluate` on the same encoder (tested); embeddings are cached by row
  id, so the query set shared by every draw of a domain is encoded once.
* `Finetune` is standard fine-tuning on the K shots: a copy of the encoder plus a linear head
  (initialised from the support prototypes, i.e. starting as the centroid classifier),
  AdamW with a warm-up/linear-decay schedule, cross-entropy, a fixed number of epochs
  (`FinetuneParams`); nothing is selected on the queries.
* `AdaptFitMethod` runs the production per-domain adaptation (`metaloop.adapt.fit`, the
  architecture's own classification head) on the support rows, for comparison.
* `MetaLearnerMethod` runs a meta-learner's `evaluate` (its own inner loop as trained);
  for ProtoNet, whose encoder does not change at test time, the cached centroid path
  (identical math) is used.

`supervised_pretrain` is the non-episodic baseline: the encoder plus one linear head over
every intent of the meta-train domains, cross-entropy on mini-batches, optionally
validated every `val_every` steps by a callback (e.g. the centroid accuracy on meta-val
episodes) with the best weights kept.

`mean_ci95` gives the mean and the half-width of the 95% confidence interval of the mean
(Student t with n-1 degrees of freedom, computed here without scipy).
"""

from __future__ import annotations

from .finetune import AdaptFitMethod, Finetune, FinetuneParams, MetaLearnerMethod, finetune_encoder, predict
from .methods import CentroidHeadFit, EmbeddingCache, EpisodeScore, FrozenCentroid, Method, score_episodes, shots_of, summarise
from .pretrain import PretrainParams, PretrainResult, supervised_pretrain
from .stats import Summary, mean_ci95, t_quantile

__all__ = [
    "AdaptFitMethod",
    "CentroidHeadFit",
    "EmbeddingCache",
    "EpisodeScore",
    "Finetune",
    "FinetuneParams",
    "FrozenCentroid",
    "MetaLearnerMethod",
    "Method",
    "PretrainParams",
    "PretrainResult",
    "Summary",
    "finetune_encoder",
    "mean_ci95",
    "predict",
    "score_episodes",
    "shots_of",
    "summarise",
    "supervised_pretrain",
    "t_quantile",
]
