"""ELECTRA (the discriminator or generator encoder, any task head): BERT's layout and position numbering; its
embeddings may be narrower than the encoder (``embedding_size < hidden_size``), then the base model's
``embeddings_project`` widens them before the first layer."""

from .bert import BertLike


class _Electra(BertLike):
    def embed(self, base_model, input_ids, token_type_ids, position_ids):
        hidden = super().embed(base_model, input_ids, token_type_ids, position_ids)
        projection = getattr(base_model, "embeddings_project", None)
        return hidden if projection is None else projection(hidden)


ELECTRA = _Electra("electra", "Electra")
