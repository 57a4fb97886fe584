"""What the slaves and the coordinator share: the control codec, addresses, NBD URIs, TLS, sizes, durable files and failpoints."""
