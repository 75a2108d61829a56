"""Membership inference and training-data extraction against fine-tuned causal LMs."""

from leaklab.attacks.membership.access import Grants, LMAccess
from leaklab.attacks.membership.registry import MEMBERSHIP_ATTACKS
from leaklab.attacks.membership.run import run_membership_attack, score_texts

__all__ = ["MEMBERSHIP_ATTACKS", "Grants", "LMAccess", "run_membership_attack", "score_texts"]
