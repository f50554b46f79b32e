"""Stage 2b, the smoke world: the tiny stand-ins trained once on the synthetic FLICKR-AES images, then cached.

With random weights the tiny decoder draws noise that the tiny verifier maps to one point, so nothing after
generation carries signal on a laptop. `cache.ensure_world` trains the decoder- and verifier-space encoders, the VAE
and the UNet + IP-Adapter on the fixture's images (recipe.py) and the tiny builders load them with the paper's calls
(`from_pretrained`, open_clip's `pretrained=` file, `pipe.load_ip_adapter`) when `models.tiny_weights == "pretrained"`
(the smoke and demo default). This stage sits above models (it trains them); the builders find the weights through
models/tiny_weights.py (its key and folders) and have a missing world trained through models/world_hook.py.
`python -m rebeca_utils.world` trains it ahead.
"""
