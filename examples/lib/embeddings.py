"""DINOv2 image embeddings, made one way for every tool that compares images by them.

Used by mapo/measure_mismatch.py (reference mismatch, MaPO §3.1) and eval/personalization.py (the dinov2 column,
MaPO Table 2): transformers' Dinov2Model, its pooled output (the layer-normed CLS token), L2-normalised, so that a
cosine similarity is a dot product.
"""


def load_dinov2(name_or_path, device, cache_dir=None):
    """(Dinov2Model in eval mode on `device`, its image processor), from a hub id or a local folder."""
    from transformers import AutoImageProcessor, Dinov2Model

    processor = AutoImageProcessor.from_pretrained(name_or_path, cache_dir=cache_dir)
    model = Dinov2Model.from_pretrained(name_or_path, cache_dir=cache_dir).to(device)
    return model.eval(), processor


def embed(model, processor, images, batch_size, device):
    """L2-normalised DINOv2 embeddings (pooled output: the layer-normed CLS token) of PIL images, (N, D)."""
    import torch

    embeddings = []
    for start in range(0, len(images), batch_size):
        inputs = processor(images=images[start : start + batch_size], return_tensors="pt").to(device)
        with torch.no_grad():
            pooled = model(**inputs).pooler_output  # (B, D)
        embeddings.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(embeddings)
