"""Client side of Bouquet: the ClientApp, the one training loop, hooks and recipes.

Importing this package is cheap; the ClientApp (``clientapps.app``) imports
torch and the data only when a message arrives.
"""
