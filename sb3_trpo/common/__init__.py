"""What the algorithms share: the trust-region mathematics, the closed-form Fisher products,
the rollout, the critic fit, the actor/critic split, validation and the base class."""
