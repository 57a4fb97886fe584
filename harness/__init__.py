"""Rigs shared by the tests, the benches and the demo (NBD peer servers,
namespace sites, the dependent-write workload, the mirror rigs' sessions)
and the demo itself.  Nothing here imports pytest or tests/; the product
never imports harness."""
