//! Configuration: typed, layered (file, config.d, environment), validated after loading.
