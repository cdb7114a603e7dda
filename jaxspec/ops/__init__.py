"""Array ops shared by the models (jaxspec/models) and their parallel forms (jaxspec/parallel): plain jnp, no
modules and no meshes, so both packages import them and neither imports the other's internals."""
