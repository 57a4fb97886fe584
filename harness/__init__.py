"""Helpers that run peers and demos around the product (NBD peer servers, the demo); the product never imports them."""
