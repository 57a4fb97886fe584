"""What the slaves and the coordinator share on the wire: addresses, NBD URIs, the control codec, TLS."""
