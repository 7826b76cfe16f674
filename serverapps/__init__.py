"""Server side app of Bouquet: the single ServerApp and its run machinery."""
