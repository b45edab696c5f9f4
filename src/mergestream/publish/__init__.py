"""What leaves a state: the merged model, a LoRA adapter, the model card.

Every module here reads a state through `MergeState.reading()`, which holds the state still
and yields a `store.generation.StateView`; none imports `state.py`, so the state's
transactions and the export formats can change apart.
"""
