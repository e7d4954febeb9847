"""SAE Factory: JumpReLU sparse autoencoders on language-model activations.

Modules (data flows one way): dataset -> buffer -> dictionary/jumprelu/trainer -> training
-> evaluation -> demo. Import what you need from the modules themselves.
"""

__version__ = "0.1.0"
