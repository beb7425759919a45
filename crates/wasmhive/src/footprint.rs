//! [`Footprint`]: what one instance of a component takes from the pooling
//! allocator, measured from a loaded component or read straight from its
//! binary (which spares loading it twice: once to measure it, once into
//! the engine whose pool is sized for it). A precompiled file has no
//! binary to read, so what it measured is remembered in the compilation
//! cache directory, keyed by the file's path, size and modification time.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;
use wasmparser::{
    ComponentAlias, ComponentExport, ComponentExternalKind, ComponentInstance,
    ComponentOuterAliasKind, ComponentTypeRef, Instance, Parser, Payload,
};

use wasmtime::component::Component;

use crate::World;

/// What one instance of a component takes from the pooling allocator.
///
/// Core instances are only counted by the pool, not reserved, so they get a
/// generous allowance; memories and tables reserve address space per slot
/// and are sized exactly.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Footprint {
    /// Linear memories one instance defines.
    pub memories: u32,
    /// Tables one instance defines.
    pub tables: u32,
    /// Largest initial size of any of its memories, in bytes.
    pub initial_memory: u64,
    /// Largest initial size of any of its tables, in elements.
    pub initial_table_elements: u64,
}

impl Default for Footprint {
    /// Room for a component built by `wit-component` from one module: a
    /// memory or two and a few tables.
    fn default() -> Self {
        Footprint {
            memories: 2,
            tables: 4,
            initial_memory: 0,
            initial_table_elements: 0,
        }
    }
}

impl Footprint {
    /// Resident bytes the pool may hold back from the system to batch the
    /// decommits of ended instances; see [`Self::decommit_batch`].
    const DECOMMIT_BATCH_BYTES: u64 = 16 << 20;

    /// How many ended instances' memories the pooling allocator decommits
    /// at once. Each decommit (`madvise`) costs a TLB shootdown on every
    /// other core running this process, so batching them is what makes a
    /// fresh instance per request cheap: hello-p2 at 32 connections went
    /// from 0.97x to 1.29x `wasmtime serve`'s req/s with batches of 16
    /// (bench harness, one round). The pages wait resident until their
    /// batch goes, so large instances batch fewer: a Python app (13 MiB of
    /// initial memory) gained nothing from it and its peak RSS grew 7%.
    /// Bytes of each linear memory that stay resident when its instance
    /// ends, reset in place (the pages it dirtied, copied back from the
    /// component's memory image) instead of handed back to the kernel, so
    /// that the next instance in that slot starts without page faults: the
    /// component's initial memory, up to 32 MiB. A Python app (13 MiB of
    /// initial memory, a fresh instance per request) went from 225 to 983
    /// req/s with it (bench harness, one round). The slots used stay as
    /// resident as they were at their busiest, so memory after a burst
    /// returns to the system only as far as instances had grown past this.
    pub(crate) fn keep_resident(&self) -> usize {
        usize::try_from(self.initial_memory.min(32 << 20)).unwrap_or(32 << 20)
    }

    ///
    /// Under a memory `budget` the batch also stays small enough that the
    /// memories waiting in it, each up to `max_memory` bytes, hold at most
    /// an eighth of the budget: an instance's memory leaves the budget when
    /// the instance ends, not when its pages go back to the system, and 16
    /// ended instances that had grown to 128 MiB would hold 2 GiB resident
    /// that no budget counts.
    pub(crate) fn decommit_batch(&self, max_memory: usize, budget: Option<usize>) -> usize {
        let per_instance = self.initial_memory.max(1);
        let batch = (Self::DECOMMIT_BATCH_BYTES / per_instance).clamp(1, 16) as usize;
        match budget {
            Some(budget) => batch.min(budget / 8 / max_memory.max(1)).max(1),
            None => batch,
        }
    }

    /// Core instances one component instance may have: only counted by the
    /// pool (no memory is reserved for them), so this is an allowance, well
    /// above the 14 of a componentize-py app.
    pub(crate) const CORE_INSTANCES: u32 = 64;

    /// Measures `component`. A component that instantiates an imported
    /// module cannot be measured; it gets the default.
    pub fn of(component: &Component) -> Footprint {
        let Some(needs) = component.resources_required() else {
            return Footprint::default();
        };
        Footprint {
            memories: needs.num_memories,
            tables: needs.num_tables,
            initial_memory: needs
                .max_initial_memory_size
                .unwrap_or(0)
                .saturating_mul(64 * 1024),
            initial_table_elements: needs.max_initial_table_size.unwrap_or(0),
        }
    }
}

/// What a component's binary says about it before it is compiled.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Measured {
    pub(crate) footprint: Footprint,
    pub(crate) world: World,
}

impl Measured {
    /// What the precompiled file at `path` measured when it was last loaded
    /// with the cache in `cache_dir`, if it has not changed since.
    pub(crate) fn remembered(cache_dir: &Path, path: &Path) -> Option<Measured> {
        let text = std::fs::read_to_string(remembered_at(cache_dir, path)?).ok()?;
        let mut fields = text.split_whitespace();
        let mut number = || fields.next()?.parse::<u64>().ok();
        let footprint = Footprint {
            memories: u32::try_from(number()?).ok()?,
            tables: u32::try_from(number()?).ok()?,
            initial_memory: number()?,
            initial_table_elements: number()?,
        };
        let world = match number()? {
            2 => World::P2,
            3 => World::P3,
            _ => return None,
        };
        Some(Measured { footprint, world })
    }

    /// Remembers what the precompiled file at `path` measured; a failure
    /// only costs the next start a measurement.
    pub(crate) fn remember(&self, cache_dir: &Path, path: &Path) {
        let Some(at) = remembered_at(cache_dir, path) else {
            return;
        };
        let Footprint {
            memories,
            tables,
            initial_memory,
            initial_table_elements,
        } = self.footprint;
        let world = match self.world {
            World::P2 => 2,
            World::P3 => 3,
        };
        let text =
            format!("{memories} {tables} {initial_memory} {initial_table_elements} {world}\n");
        // Written aside and renamed, so that a reader sees all or nothing.
        let staged = at.with_extension(format!("{}.tmp", std::process::id()));
        let stored = std::fs::create_dir_all(at.parent().unwrap_or(cache_dir))
            .and_then(|()| std::fs::write(&staged, text))
            .and_then(|()| std::fs::rename(&staged, &at));
        if let Err(error) = stored {
            tracing::debug!(%error, "cannot remember a precompiled component's footprint");
        }
    }
}

/// Where what the file at `path` measured is kept: named by its absolute
/// path, size and modification time, and this crate's version.
fn remembered_at(cache_dir: &Path, path: &Path) -> Option<PathBuf> {
    use std::hash::{Hash as _, Hasher as _};
    let path = path.canonicalize().ok()?;
    let metadata = std::fs::metadata(&path).ok()?;
    let modified = metadata.modified().ok()?.duration_since(UNIX_EPOCH).ok()?;
    let mut key = std::collections::hash_map::DefaultHasher::new();
    (path, metadata.len(), modified, env!("CARGO_PKG_VERSION")).hash(&mut key);
    Some(
        cache_dir
            .join("wasmhive-footprints")
            .join(format!("{:016x}", key.finish())),
    )
}

/// What an instance of a core module, or of a component, takes: the
/// memories and tables it defines (not imports), its nested instances'
/// included.
#[derive(Clone, Copy, Default)]
struct Needs {
    memories: u32,
    tables: u32,
    /// Largest initial memory, in 64 KiB pages.
    initial_pages: u64,
    initial_table_elements: u64,
}

impl Needs {
    fn add(&mut self, other: Needs) {
        self.memories += other.memories;
        self.tables += other.tables;
        self.initial_pages = self.initial_pages.max(other.initial_pages);
        self.initial_table_elements = self
            .initial_table_elements
            .max(other.initial_table_elements);
    }
}

/// A component being read: its core module and component index spaces
/// (`None` for what comes from outside it, which only loading can measure)
/// and what instantiating it takes so far.
#[derive(Default)]
struct Scope {
    modules: Vec<Option<Needs>>,
    components: Vec<Option<Needs>>,
    total: Needs,
}

/// [`Measured::from_binary`] between two payloads of the binary. Each
/// method takes in one section; `None` means the binary cannot be measured.
struct Reader {
    /// The components being read, innermost last.
    scopes: Vec<Scope>,
    /// The core module being read, if any.
    module: Option<Needs>,
    world: World,
}

impl Reader {
    /// Takes in one payload: breaks with the measure once the outermost
    /// component ends.
    fn read(&mut self, payload: Payload<'_>) -> Option<ControlFlow<Measured>> {
        match payload {
            Payload::Version { encoding, .. } => match encoding {
                wasmparser::Encoding::Component => self.scopes.push(Scope::default()),
                wasmparser::Encoding::Module if self.module.is_some() => {}
                // A core module alone is not a component.
                wasmparser::Encoding::Module => return None,
            },
            Payload::ModuleSection { .. } => self.module = Some(Needs::default()),
            Payload::MemorySection(reader) => {
                let module = self.module.as_mut()?;
                for memory in reader {
                    module.add(Needs {
                        memories: 1,
                        initial_pages: memory.ok()?.initial,
                        ..Needs::default()
                    });
                }
            }
            Payload::TableSection(reader) => {
                let module = self.module.as_mut()?;
                for table in reader {
                    module.add(Needs {
                        tables: 1,
                        initial_table_elements: table.ok()?.ty.initial,
                        ..Needs::default()
                    });
                }
            }
            Payload::End(_) => return self.end(),
            Payload::InstanceSection(reader) => {
                let scope = self.scopes.last_mut()?;
                for instance in reader {
                    if let Instance::Instantiate { module_index, .. } = instance.ok()? {
                        let needs = (*scope.modules.get(module_index as usize)?)?;
                        scope.total.add(needs);
                    }
                }
            }
            Payload::ComponentInstanceSection(reader) => {
                let scope = self.scopes.last_mut()?;
                for instance in reader {
                    if let ComponentInstance::Instantiate {
                        component_index, ..
                    } = instance.ok()?
                    {
                        let needs = (*scope.components.get(component_index as usize)?)?;
                        scope.total.add(needs);
                    }
                }
            }
            // What comes from outside can only be measured once loaded.
            Payload::ComponentImportSection(reader) => {
                let scope = self.scopes.last_mut()?;
                for import in reader {
                    match import.ok()?.ty {
                        ComponentTypeRef::Module(_) => scope.modules.push(None),
                        ComponentTypeRef::Component(_) => scope.components.push(None),
                        _ => {}
                    }
                }
            }
            Payload::ComponentAliasSection(reader) => {
                for alias in reader {
                    self.alias(alias.ok()?)?;
                }
            }
            Payload::ComponentExportSection(reader) => {
                for export in reader {
                    self.export(export.ok()?)?;
                }
            }
            _ => {}
        }
        Some(ControlFlow::Continue(()))
    }

    /// The end of a core module, or of a component: what it needs joins
    /// its parent's index space, or is the answer for the outermost one.
    fn end(&mut self) -> Option<ControlFlow<Measured>> {
        if let Some(done) = self.module.take() {
            self.scopes.last_mut()?.modules.push(Some(done));
            return Some(ControlFlow::Continue(()));
        }
        let done = self.scopes.pop()?;
        match self.scopes.last_mut() {
            Some(parent) => parent.components.push(Some(done.total)),
            None => return Some(ControlFlow::Break(Measured::of(done.total, self.world))),
        }
        Some(ControlFlow::Continue(()))
    }

    /// An alias is a new index in its sort's space: one of an instance's
    /// exports (unknown here), or an enclosing component's module or
    /// component (known).
    fn alias(&mut self, alias: ComponentAlias<'_>) -> Option<()> {
        match alias {
            ComponentAlias::InstanceExport { kind, .. } => {
                let scope = self.scopes.last_mut()?;
                match kind {
                    ComponentExternalKind::Module => scope.modules.push(None),
                    ComponentExternalKind::Component => scope.components.push(None),
                    _ => {}
                }
            }
            ComponentAlias::Outer { kind, count, index } => {
                let outer = self.scopes.len().checked_sub(1 + count as usize)?;
                let (outer, index) = (&self.scopes[outer], index as usize);
                match kind {
                    ComponentOuterAliasKind::CoreModule => {
                        let needs = *outer.modules.get(index)?;
                        self.scopes.last_mut()?.modules.push(needs);
                    }
                    ComponentOuterAliasKind::Component => {
                        let needs = *outer.components.get(index)?;
                        self.scopes.last_mut()?.components.push(needs);
                    }
                    _ => {}
                }
            }
            ComponentAlias::CoreInstanceExport { .. } => {}
        }
        Some(())
    }

    /// An export is a new index in its sort's space too; the outermost
    /// component's exports also tell its world.
    fn export(&mut self, export: ComponentExport<'_>) -> Option<()> {
        let outermost = self.scopes.len() == 1;
        let scope = self.scopes.last_mut()?;
        let index = export.index as usize;
        match export.kind {
            ComponentExternalKind::Module => {
                let needs = *scope.modules.get(index)?;
                scope.modules.push(needs);
            }
            ComponentExternalKind::Component => {
                let needs = *scope.components.get(index)?;
                scope.components.push(needs);
            }
            _ => {}
        }
        if outermost && export.name.name.starts_with(World::P3_EXPORT) {
            self.world = World::P3;
        }
        Some(())
    }
}

impl Measured {
    /// Reads the footprint and world of the component in `bytes` without
    /// compiling it, as [`Footprint::of`] would measure them once loaded:
    /// the memories and tables of every core module it instantiates,
    /// through its nested components. `None` for what only loading can
    /// tell (a module or component imported from outside) and for a binary
    /// that does not parse (loading reports why).
    pub(crate) fn from_binary(bytes: &[u8]) -> Option<Measured> {
        let mut reader = Reader {
            scopes: Vec::new(),
            module: None,
            world: World::P2,
        };
        for payload in Parser::new(0).parse_all(bytes) {
            if let ControlFlow::Break(measured) = reader.read(payload.ok()?)? {
                return Some(measured);
            }
        }
        None
    }

    fn of(needs: Needs, world: World) -> Measured {
        Measured {
            footprint: Footprint {
                memories: needs.memories,
                tables: needs.tables,
                initial_memory: needs.initial_pages.saturating_mul(64 * 1024),
                initial_table_elements: needs.initial_table_elements,
            },
            world,
        }
    }
}

#[cfg(test)]
mod tests {
    use wasmhive_guests as guests;
    use wasmtime::{Config, Engine};

    use super::*;

    fn engine() -> Engine {
        let mut config = Config::new();
        config.wasm_component_model_async(true);
        Engine::new(&config).unwrap()
    }

    /// What loading the component measures.
    fn loaded(engine: &Engine, bytes: &[u8]) -> Measured {
        let component = Component::new(engine, bytes).unwrap();
        Measured {
            footprint: Footprint::of(&component),
            world: World::exported_by(&component, engine),
        }
    }

    #[test]
    fn the_binary_says_what_loading_measures_for_every_guest() {
        let engine = engine();
        for guest in [
            guests::HELLO_P2,
            guests::HELLO_P3,
            guests::ECHO_P2,
            guests::FAULT_P3,
            guests::FETCH_P3,
            guests::PYTHON_APP,
            guests::JS_APP,
        ] {
            let bytes = guest.bytes();
            assert_eq!(
                Measured::from_binary(&bytes),
                Some(loaded(&engine, &bytes)),
                "{}",
                guest.name
            );
        }
    }

    #[test]
    fn every_instantiation_of_a_module_counts_and_imported_memories_do_not() {
        let bytes = wat::parse_str(
            r#"(component
                (core module $m (memory (export "mem") 3) (table 5 funcref))
                (core module $n (import "m" "mem" (memory 1)) (memory 9) (memory 2))
                (core instance $a (instantiate $m))
                (core instance (instantiate $m))
                (core instance (instantiate $n (with "m" (instance (export "mem" (memory $a "mem"))))))
            )"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let measured = Measured::from_binary(&bytes).unwrap();
        assert_eq!(measured, loaded(&engine(), &bytes));
        assert_eq!(
            measured.footprint,
            Footprint {
                memories: 4,
                tables: 2,
                initial_memory: 9 * 64 * 1024,
                initial_table_elements: 5,
            }
        );
        assert_eq!(measured.world, World::P2);
    }

    #[test]
    fn nested_components_count_for_each_instantiation() {
        let bytes = wat::parse_str(
            r#"(component
                (core module $m (memory 2))
                (component $c
                    (core module $n (memory 7) (table 1 funcref))
                    (core instance (instantiate $n))
                    (alias outer 1 $m (core module $outer))
                    (core instance (instantiate $outer))
                )
                (instance (instantiate $c))
                (instance (instantiate $c))
            )"#,
        )
        .unwrap_or_else(|e| panic!("{e}"));
        let measured = Measured::from_binary(&bytes).unwrap();
        assert_eq!(measured, loaded(&engine(), &bytes));
        assert_eq!(measured.footprint.memories, 4);
        assert_eq!(measured.footprint.tables, 2);
    }

    #[test]
    fn a_precompiled_files_measure_is_remembered_until_the_file_changes() {
        let dir = std::env::temp_dir().join(format!("wasmhive-footprints-{}", std::process::id()));
        let (cache, file) = (dir.join("cache"), dir.join("app.cwasm"));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(&file, b"compiled code").unwrap();
        let measured = Measured {
            footprint: Footprint {
                memories: 3,
                tables: 5,
                initial_memory: 13 << 20,
                initial_table_elements: 7000,
            },
            world: World::P2,
        };
        assert_eq!(Measured::remembered(&cache, &file), None);
        measured.remember(&cache, &file);
        assert_eq!(Measured::remembered(&cache, &file), Some(measured));
        // Another file at the same path is measured anew.
        std::fs::write(&file, b"other compiled code").unwrap();
        assert_eq!(Measured::remembered(&cache, &file), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn modules_from_outside_are_left_to_loading() {
        for text in [
            "(component (import \"m\" (core module $m)) (core instance (instantiate $m)))",
            "(component (import \"c\" (component $c)) (instance (instantiate $c)))",
        ] {
            let bytes = wat::parse_str(text).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!(Measured::from_binary(&bytes), None, "{text}");
        }
        assert_eq!(Measured::from_binary(b"\0asm not really"), None);
    }

    #[test]
    fn a_memory_budget_bounds_what_waits_to_be_decommitted() {
        let small = Footprint {
            initial_memory: 64 << 10,
            ..Footprint::default()
        };
        let max_memory = 128 << 20;
        assert_eq!(small.decommit_batch(max_memory, None), 16);
        // An eighth of 2 GiB is two 128 MiB memories.
        assert_eq!(small.decommit_batch(max_memory, Some(2 << 30)), 2);
        assert_eq!(small.decommit_batch(max_memory, Some(64 << 30)), 16);
        assert_eq!(small.decommit_batch(max_memory, Some(64 << 20)), 1);
        // A large initial memory batches little whatever the budget.
        let python = Footprint {
            initial_memory: 13 << 20,
            ..Footprint::default()
        };
        assert_eq!(python.decommit_batch(max_memory, Some(64 << 30)), 1);
    }
}
