"""The HF Trainer's division by the gradient-accumulation steps, undone where transformers does not ask first.

``compute_loss`` returns each micro-batch's share of the loss already normalised over the whole optimizer step (its
tokens counted over every micro-batch). transformers 5.18 and newer read the trainer's ``loss_is_scaled_for_ga``
(the plugin sets it) and leave such a loss as it is; 5.17 and older divide it by the accumulation steps unless the
model takes loss kwargs with a token count or ``compute_loss_func`` is set: the gradient and the logged loss were
then 1/``--gradient_accumulation_steps`` of the step's (found by tests/compat at the range's lower end).
"""
from transformers import Trainer

__all__ = ['TRAINER_READS_LOSS_IS_SCALED_FOR_GA', 'undo_trainer_ga_division']

TRAINER_READS_LOSS_IS_SCALED_FOR_GA = hasattr(Trainer, 'loss_is_scaled_for_ga')


def undo_trainer_ga_division(trainer, loss, num_items_in_batch):
    """``loss`` times the factor this transformers' ``training_step`` divides it by afterwards (1 where it does
    not: transformers 5.18+, evaluation, a model taking loss kwargs with a token count, a ``compute_loss_func``)."""
    if TRAINER_READS_LOSS_IS_SCALED_FOR_GA or not trainer.model.training:
        return loss
    divides = ((not trainer.model_accepts_loss_kwargs or num_items_in_batch is None)
               and trainer.compute_loss_func is None)
    return loss * trainer.current_gradient_accumulation_steps if divides else loss
