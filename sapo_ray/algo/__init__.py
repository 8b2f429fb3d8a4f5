"""The algorithm core: pure tensor functions, no Ray and no I/O.

* ``segments``   -- split responses into segments (entropy top-k and the ablation strategies)
* ``advantages`` -- segment-level GAE (SAPO), token GAE (PPO), group baselines (GRPO, Dr.GRPO, RLOO)
* ``losses``     -- segment/token/sequence-ratio clipped policy loss, clipped value loss, masked stats
* ``kl``         -- k1/k2/k3 KL estimators and the KL loss
* ``registry``   -- ``AlgorithmSpec`` table (sapo, ppo, vc_ppo, grpo, dr_grpo, rloo, gspo, dapo, soft_sapo) and
  the single entry points a trainer calls (``compute_advantages``, ``policy_loss``, ...)
"""

from sapo_ray.algo import advantages, kl, losses, registry, segments

__all__ = ["advantages", "kl", "losses", "registry", "segments"]
