"""Flow-matching noise schedule of the distilled Wan2.1 causal DiT (shift 8, 1000 training steps).

Shape legend:
    B  rows (samples) of a batch        C  latent channels (16)
    F  latent frames                    H, W  latent height / width
    K  grid points of the schedule (1000)

The schedule is a fixed grid of K points, u_k = 1 - k/K for k = 0..K-1 (the linspace from 1 to 0 with
K+1 points, last point dropped), shifted as sigma_k = s*u / (1 + (s-1)*u) and t_k = K * sigma_k.
Timesteps handed around Weir are integers (700, 500, the motion controller's 600..700); every
operation looks sigma up at the grid point nearest to t:

    add_noise(x, eps, t) = (1 - sigma(t)) * x + sigma(t) * eps        (float32 sigma, as the reference)
    flow_to_x0(v, x_t, t) = x_t - sigma(t) * v                         (computed in float64)

Worked example (shift 8): t = 700 -> nearest grid point k = 774, u = 0.226, sigma = 8*0.226/(1+7*0.226)
= 0.7003..., so sigma(t) ~= t/1000 near the published step list (700, 500, 400, 200).

The nearest grid index of every integer t in [0, K] is precomputed once (twice in fact: the reference
measures the distance in float32 for add_noise and in float64 for the x0 conversion, which may pick a
different neighbour at an exact tie), so a lookup is a gather with no host sync.
"""

from __future__ import annotations

import torch


class FlowMatchSchedule:
    """The shifted flow-matching grid and the two conversions the stream loop needs.

    Not an nn.Module: it holds only constants. Tables live on the device given at construction.
    """

    def __init__(
        self,
        *,
        shift: float = 8.0,
        num_train_timesteps: int = 1000,
        device: torch.device | str = "cpu",
    ) -> None:
        if shift <= 0:
            raise ValueError(f"shift={shift} must be > 0")
        if num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps={num_train_timesteps} must be >= 2")
        self.shift = shift
        self.num_train_timesteps = num_train_timesteps
        device = torch.device(device)
        k = num_train_timesteps
        u_K = torch.linspace(1.0, 0.0, k + 1, dtype=torch.float32)[:-1]
        sigmas_K = shift * u_K / (1 + (shift - 1) * u_K)
        timesteps_K = sigmas_K * k
        # nearest grid index for every integer t in [0, K], in the two precisions the reference uses
        t_T = torch.arange(k + 1, dtype=torch.int64)
        index32_T = (timesteps_K[None, :] - t_T[:, None]).abs().argmin(dim=1)
        index64_T = (timesteps_K.double()[None, :] - t_T[:, None].double()).abs().argmin(dim=1)
        self.sigmas_K = sigmas_K.to(device)
        self.timesteps_K = timesteps_K.to(device)
        self._sigma32_T = sigmas_K[index32_T].to(device)
        self._sigma64_T = sigmas_K.double()[index64_T].to(device)

    def to(self, device: torch.device | str) -> FlowMatchSchedule:
        """A copy of this schedule with its tables on `device`."""
        return FlowMatchSchedule(
            shift=self.shift, num_train_timesteps=self.num_train_timesteps, device=device
        )

    def sigma(self, timesteps_B: torch.Tensor) -> torch.Tensor:
        """float32 sigma at the nearest grid point of each integer timestep, shape [B]."""
        return self._sigma32_T[timesteps_B.long()]

    def add_noise(
        self, x_BCFHW: torch.Tensor, noise_BCFHW: torch.Tensor, timesteps_B: torch.Tensor
    ) -> torch.Tensor:
        """(1 - sigma) * x + sigma * noise per row, sigma in float32, result in noise's dtype.

        Any trailing shape works: sigma is broadcast over every dim after the first.
        """
        sigma_B = self.sigma(timesteps_B.to(self._sigma32_T.device))
        sigma = sigma_B.reshape(-1, *([1] * (x_BCFHW.dim() - 1)))
        return ((1 - sigma) * x_BCFHW + sigma * noise_BCFHW).type_as(noise_BCFHW)

    def flow_to_x0(
        self, flow_BCFHW: torch.Tensor, x_t_BCFHW: torch.Tensor, timesteps_B: torch.Tensor
    ) -> torch.Tensor:
        """x0 = x_t - sigma(t) * v, computed in float64 and returned in the flow's dtype."""
        sigma_B = self._sigma64_T[timesteps_B.to(self._sigma64_T.device).long()]
        sigma = sigma_B.reshape(-1, *([1] * (flow_BCFHW.dim() - 1)))
        x0 = x_t_BCFHW.double() - sigma * flow_BCFHW.double()
        return x0.to(flow_BCFHW.dtype)


def denoising_steps(step_list: tuple[int, ...], num_steps: int) -> tuple[int, ...]:
    """The first `num_steps` entries of the step list: (700, 500, 400, 200), 2 -> (700, 500).

    Video-to-video never appends the trailing 0 (the reference appends it and removes it again).
    """
    if not 1 <= num_steps <= len(step_list):
        raise ValueError(f"num_steps={num_steps} must be in 1..{len(step_list)}")
    return tuple(int(t) for t in step_list[:num_steps])
