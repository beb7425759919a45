//! [`World`]: which `wasi:http` world a component implements.

use wasmtime::Engine;
use wasmtime::component::Component;

/// Which `wasi:http` world a component implements.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum World {
    /// WASIp2 `wasi:http/proxy`, exporting `wasi:http/incoming-handler@0.2`.
    P2,
    /// WASIp3 `wasi:http/service`, exporting `wasi:http/handler@0.3`.
    P3,
}

impl World {
    /// The start of the name of the interface a p3 component exports.
    pub(crate) const P3_EXPORT: &str = "wasi:http/handler@0.3";

    /// The world `component` exports: p3 if it exports
    /// `wasi:http/handler@0.3`, else p2 (whether it really exports
    /// `incoming-handler@0.2` is checked when it is linked, by
    /// [`App::new`](crate::App::new)).
    pub(crate) fn exported_by(component: &Component, engine: &Engine) -> World {
        let p3 = component
            .component_type()
            .exports(engine)
            .any(|(name, _)| name.starts_with(Self::P3_EXPORT));
        if p3 { World::P3 } else { World::P2 }
    }
}
