"""Joint-attention transformers (SD3's MMDiT, Flux) as flow denoisers: how each is called.

The stages see every teacher's model space as C x H x W latents; what differs is the network's call:
- ``SD3Transformer2DModel``: ``(latents, timestep=s * T, encoder_hidden_states, pooled_projections)``, as
  ``StableDiffusion3Pipeline`` calls it.
- ``FluxTransformer2DModel``: 2 x 2 patches of the latents packed into a sequence of 4C-wide tokens with their
  (0, row, column) ids, the prompt's T5 tokens with zero ids, ``timestep=s`` (the network multiplies by 1000
  itself) and, for guidance-distilled models (``guidance_embeds``, Flux-dev), the guidance scale as an input,
  as ``FluxPipeline`` calls it. Packing is a fixed permutation of the latents' numbers, so the flow's
  elementwise maps (x_s = (1 - s) x0 + s eps, x0 = x_s - s v) commute with it: packing inside the network
  call keeps pairs, the DMD losses, the VAE and the shards the same as for every other latent teacher.

Kept apart from the layouts (it imports only the denoisers) so that ``common.make_denoiser`` (saved generators) and
the layouts (teachers) build the same denoiser for the same network.
"""

from __future__ import annotations

import torch

from ..denoisers import FlowDenoiser, Parametrization, flow_sampling_sigmas

Tensor = torch.Tensor


def pooled_kwargs(rows: dict[str, Tensor]) -> dict:
    """SD3 and Flux: the token embeddings and the pooled prompt embedding, under the transformers' names."""
    if "pooled" not in rows:
        raise ValueError("this transformer needs the pooled prompt embeddings: these prompt rows have none (encode them with its layout's encoder)")
    return {"encoder_hidden_states": rows["hidden"], "pooled_projections": rows["pooled"]}


class PooledFlowDenoiser(FlowDenoiser):
    """A flow denoiser whose network reads the pooled prompt embedding beside the token embeddings (SD3, Flux)."""

    def __init__(self, unet: torch.nn.Module, param: Parametrization):
        super().__init__(unet, param)
        self.text_kwargs = pooled_kwargs

    def set_param(self, param: Parametrization) -> None:
        super().set_param(param)
        self.text_kwargs = pooled_kwargs


class SD3Denoiser(PooledFlowDenoiser):
    """A ``SD3Transformer2DModel`` on the flow parametrisation: its timestep is s * num_train_timesteps."""

    def _unet(self, x: Tensor, t: Tensor, labels: Tensor | None, **cond) -> Tensor:
        # the timestep by name: the transformer's second positional argument is encoder_hidden_states
        kwargs = {**cond, **self.prompt_kwargs(labels)}
        return self.unet(x.to(self.dtype), timestep=t, **kwargs, return_dict=False)[0]


def pack_latents(x: Tensor) -> Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): FluxPipeline's ``_pack_latents`` (2 x 2 patches, row-major)."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(x: Tensor, h: int, w: int) -> Tensor:
    """The inverse of ``pack_latents``: (B, H/2 * W/2, 4C) -> (B, C, H, W) (FluxPipeline's ``_unpack_latents``)."""
    b, _, c4 = x.shape
    return x.view(b, h // 2, w // 2, c4 // 4, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c4 // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """(H/2 * W/2, 3) position ids (0, row, column) of the packed tokens, as FluxPipeline's ``_prepare_latent_image_ids``."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


def flux_base_sigmas(steps: int) -> list[float]:
    """The unshifted levels FluxPipeline passes its scheduler: linspace(1, 1/N, N) (numpy's, as the pipeline)."""
    import numpy as np

    return np.linspace(1.0, 1 / steps, steps).tolist()


class FluxDenoiser(PooledFlowDenoiser):
    """A ``FluxTransformer2DModel`` on the flow parametrisation, on unpacked C x H x W latents (packed per call)."""

    def sigmas(self, steps: int) -> Tensor:
        """FluxPipeline's levels: its linspace(1, 1/N, N), shifted by the scheduler (dynamically for Flux), then 0."""
        return flow_sampling_sigmas(self.param, steps, base=flux_base_sigmas(steps))

    def _unet(self, x: Tensor, t: Tensor, labels: Tensor | None, guidance: Tensor | None = None, **cond) -> Tensor:
        _, _, h, w = x.shape
        kwargs = {**cond, **self.prompt_kwargs(labels)}
        hidden = kwargs["encoder_hidden_states"]
        out = self.unet(
            pack_latents(x.to(self.dtype)),
            timestep=t.to(self.dtype) / 1000,  # the pipeline's timestep / 1000: the network scales it back itself
            img_ids=latent_image_ids(h, w, x.device, self.dtype),
            txt_ids=torch.zeros(hidden.shape[1], 3, device=x.device, dtype=self.dtype),  # FluxPipeline's text ids
            guidance=guidance if self.param.guidance_embeds else None,
            **kwargs,
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)


# The network classes that are called otherwise than a UNet, with the denoiser that calls them.
TRANSFORMER_DENOISERS = {"SD3Transformer2DModel": SD3Denoiser, "FluxTransformer2DModel": FluxDenoiser}


def flow_denoiser(net: torch.nn.Module, param: Parametrization) -> FlowDenoiser:
    """The flow denoiser of ``net``: a prompt-conditioned SD3 or Flux transformer's own, else the plain ``FlowDenoiser``."""
    cls = TRANSFORMER_DENOISERS.get(type(net).__name__, FlowDenoiser) if param.text_conditioned else FlowDenoiser
    return cls(net, param)
