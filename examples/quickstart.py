"""The README's example: one ANODEV2 block on random images, and its gradients."""

import jax
import jax.numpy as jnp

import anodev2_jax as ad


def f(z, theta, args):  # the activation field: conv3x3 + tanh
    dims = ("NHWC", "HWIO", "NHWC")
    return jnp.tanh(jax.lax.conv_general_dilated(z, theta, (1, 1), "SAME", dimension_numbers=dims))


z0 = jax.random.normal(jax.random.key(0), (8, 32, 32, 16))  # activations (N, H, W, C)
w0 = 0.1 * jax.random.normal(jax.random.key(1), (3, 3, 16, 16))  # conv kernel (kh, kw, cin, cout)
p = ad.RDA().init(w0)  # diffusion, advection (vx, vy), reaction: 4 scalars
z1 = ad.coupled_solve(f, z0, w0, p, num_z_steps=5, schedule="conf1")  # paper's configuration 1
loss = lambda w0, p: jnp.mean(ad.coupled_solve(f, z0, w0, p, num_z_steps=5) ** 2)
grad_w0, grad_p = jax.grad(loss, argnums=(0, 1))(w0, p)  # exact DTO gradients
print(z1.shape, float(loss(w0, p)), {k: float(v) for k, v in grad_p.items()})
