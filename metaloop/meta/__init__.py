"""Meta-learning core: learn an initialisation of a Transformer encoder from many domains.

Modules, each with one concern:

* `encoder`    - the Hugging Face encoder as a function of its parameters
                 (`torch.func.functional_call`), adapt scopes (all / top_k / head / lora),
                 length groups (each set padded per group of similar lengths).
* `pooling`    - token states -> sentence embedding (mean or cls).
* `head`       - the any-N classification head: a linear layer initialised from the support
                 prototypes (W_k = 2 c_k, b_k = -||c_k||^2, "Proto-MAML"), so episodes with any
                 number of classes share one meta-learned encoder and nothing class-specific
                 is stored.
* `inner`      - the inner loop (fast weights as dicts, first or second order), and its
                 replayed variant that keeps one step's graph at a time (memory saver).
* `vocab`      - the episode vocabulary: only the word-embedding rows an episode uses adapt.
* `algorithms` - maml, fomaml, reptile, protonet, metasgd, anil behind one interface.
* `data`       - episodes as token tensors.
* `dist`, `checkpoint` - distributed helpers and resumable checkpoints for `metaloop.train`.

    learner = build_learner(model, LearnerConfig.from_params(params.meta, params.backbone))
    learner.outer_backward(batch, weight=1 / meta_batch_size)   # then optimizer.step()
"""

from metaloop.meta.algorithms import (
    ALGORITHMS,
    LearnerConfig,
    MetaLearner,
    Outcome,
    build_learner,
)
from metaloop.meta.data import EpisodeBatch, episode_batch, tokenize
from metaloop.meta.encoder import Encoder, adapt_names
from metaloop.meta.head import head_logits, proto_head, proto_logits, prototypes
from metaloop.meta.inner import Adapted, inner_loop, query_logits

__all__ = [
    "ALGORITHMS", "Adapted", "Encoder", "EpisodeBatch", "LearnerConfig", "MetaLearner", "Outcome",
    "adapt_names", "build_learner", "episode_batch", "head_logits", "inner_loop", "proto_head",
    "proto_logits", "prototypes", "query_logits", "tokenize",
]
