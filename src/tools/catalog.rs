//! The tool catalog: every tool tollgate serves, its input validator, price and handler.
//!
//! Built at startup from config and never edited in place: a change (an upstream that was down
//! at start and now answers) builds a new catalog and swaps it in whole (`LiveCatalog`), so one
//! request sees one catalog, and `tools/list` and the quotes in its challenges never disagree.

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

use rmcp::model::{CallToolResult, JsonObject, MetaObject, Tool};
use serde_json::Value;

use crate::config::{ChargePolicy, PriceSetting};
use crate::payment::price::Pricing;
use crate::payment::requirements::{PayTerms, Quote};

/// Runs a tool. Arguments have already been validated against the tool's input schema.
#[async_trait::async_trait]
pub trait ToolHandler: Send + Sync + 'static {
    async fn call(&self, args: JsonObject) -> CallToolResult;

    /// Whether the tool can run now; checked before a payment is taken.
    async fn ready(&self) -> Result<(), String> {
        Ok(())
    }
}

/// One servable tool.
pub struct ToolEntry {
    /// The MCP definition shown in `tools/list`, with the price in `_meta` when priced.
    pub tool: Tool,
    /// `None` for a free tool; else the quote at the fixed price (or the expression's floor):
    /// a call's own quote comes from `pricing`.
    pub quote: Option<Arc<Quote>>,
    pub pricing: Option<Pricing>,
    /// Where the price is configured, so a reload can find it again.
    pub source: PriceSource,
    validator: Arc<jsonschema::Validator>,
    handler: Arc<dyn ToolHandler>,
}

/// Where a tool's price lives in config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PriceSource {
    /// `[tools.prices]`, under the tool's name.
    Builtin,
    /// `[[upstream]]` `name`'s prices, under the upstream's own tool name.
    Upstream { upstream: String, remote: String },
    /// Given in code (tests, embedders): not repriced by a reload.
    Injected,
}

/// A tool to add to the catalog.
pub struct NewTool<'a> {
    /// Who offers it ("a built-in", "upstream `files`"), to name both sides of a duplicate.
    pub origin: &'a str,
    pub name: &'a str,
    pub description: &'a str,
    pub input_schema: Value,
    pub handler: Arc<dyn ToolHandler>,
    pub source: PriceSource,
}

/// A tool's configured price and the charge policy it falls back to.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolPrice {
    pub setting: PriceSetting,
    pub default_charge: ChargePolicy,
}

impl ToolPrice {
    pub fn fixed(amount: crate::money::UsdcAmount) -> ToolPrice {
        ToolPrice { setting: PriceSetting::Fixed(amount), default_charge: ChargePolicy::BeforeRun }
    }
}

impl ToolEntry {
    /// Checks arguments against the input schema; returns readable problems, at most ten.
    pub fn validate(&self, args: &JsonObject) -> Result<(), Vec<String>> {
        let instance = Value::Object(args.clone());
        let problems: Vec<String> = self
            .validator
            .iter_errors(&instance)
            .take(10)
            .map(|e| {
                let path = e.instance_path.to_string();
                if path.is_empty() { e.to_string() } else { format!("{path}: {e}") }
            })
            .collect();
        if problems.is_empty() { Ok(()) } else { Err(problems) }
    }

    /// The `_meta["x402/price"]` value `tools/list` shows (None when free).
    pub fn price_meta(&self) -> Option<Value> {
        let (quote, pricing) = (self.quote.as_ref()?, self.pricing.as_ref()?);
        Some(quote.price_meta(pricing).1)
    }

    /// The upstream (name, and the tool's own name there) an upstream tool comes from.
    pub fn upstream(&self) -> Option<(&str, &str)> {
        match &self.source {
            PriceSource::Upstream { upstream, remote } => Some((upstream, remote)),
            _ => None,
        }
    }

    pub async fn ready(&self) -> Result<(), String> {
        self.handler.ready().await
    }

    pub async fn run(&self, args: &JsonObject) -> CallToolResult {
        self.handler.call(args.clone()).await
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("tool `{tool}` has an invalid input schema: {reason}")]
    BadSchema { tool: String, reason: String },
    #[error("tool `{tool}` has an invalid price: {reason}")]
    BadPrice { tool: String, reason: String },
    /// Two sources offer one name: the later would silently take the earlier's place (and
    /// price), so the server refuses to start and names both.
    #[error("tool `{tool}` is offered twice, by {first} and by {second}: give one a prefix or hide it")]
    Duplicate { tool: String, first: String, second: String },
}

/// All tools, in a stable order.
#[derive(Default, Clone)]
pub struct Catalog {
    /// Shared, so a paid call's task can own its entry past the request.
    entries: BTreeMap<String, Arc<ToolEntry>>,
    /// Where each tool comes from ("built-in", "upstream `files`"), to name both of a duplicate.
    origins: BTreeMap<String, String>,
}

impl Catalog {
    /// Adds a tool at `price` (zero makes it free). A name already taken is an error, never a
    /// replacement; a price expression that does not check against the tool's schema too.
    pub fn insert(
        &mut self,
        new: NewTool<'_>,
        price: &ToolPrice,
        terms: &PayTerms,
    ) -> Result<(), CatalogError> {
        let NewTool { origin, name, description, input_schema, handler, source } = new;
        if let Some(first) = self.origins.get(name) {
            let (tool, first, second) = (name.to_owned(), first.clone(), origin.to_owned());
            return Err(CatalogError::Duplicate { tool, first, second });
        }
        let bad_schema = |reason: String| CatalogError::BadSchema { tool: name.to_owned(), reason };
        let Value::Object(schema) = input_schema else {
            return Err(bad_schema("must be a JSON object".into()));
        };
        let validator = jsonschema::validator_for(&Value::Object(schema.clone()))
            .map_err(|e| bad_schema(e.to_string()))?;
        let tool = Tool::new(name.to_owned(), description.to_owned(), Arc::new(schema));
        let entry = priced(tool, Arc::new(validator), handler, source, price, terms)?;
        self.entries.insert(name.to_owned(), Arc::new(entry));
        self.origins.insert(name.to_owned(), origin.to_owned());
        Ok(())
    }

    /// A reload: every tool whose configured price `price_of` finds gets it (in place of its
    /// old one); tools it does not find keep theirs. All or nothing: one bad price fails the
    /// whole change. Returns the names whose price or policy changed.
    pub fn reprice(
        &mut self,
        terms: &PayTerms,
        mut price_of: impl FnMut(&str, &PriceSource) -> Option<ToolPrice>,
    ) -> Result<Vec<String>, CatalogError> {
        let mut changed = Vec::new();
        for (name, entry) in self.entries.iter_mut() {
            let Some(price) = price_of(name, &entry.source) else { continue };
            let mut tool = entry.tool.clone();
            tool.meta = None;
            let next = priced(
                tool,
                entry.validator.clone(),
                entry.handler.clone(),
                entry.source.clone(),
                &price,
                terms,
            )?;
            if next.tool.meta != entry.tool.meta {
                changed.push(name.clone());
            }
            *entry = Arc::new(next);
        }
        Ok(changed)
    }

    pub fn get(&self, name: &str) -> Option<&Arc<ToolEntry>> {
        self.entries.get(name)
    }

    /// Every tool with its quote, in the same stable order as `tools`.
    pub fn entries(&self) -> impl Iterator<Item = &ToolEntry> {
        self.entries.values().map(|e| &**e)
    }

    pub fn tools(&self) -> Vec<Tool> {
        self.entries.values().map(|e| e.tool.clone()).collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// A tool's entry at `price`: its pricing, its quote and the price in its `_meta`.
fn priced(
    mut tool: Tool,
    validator: Arc<jsonschema::Validator>,
    handler: Arc<dyn ToolHandler>,
    source: PriceSource,
    price: &ToolPrice,
    terms: &PayTerms,
) -> Result<ToolEntry, CatalogError> {
    let name = tool.name.to_string();
    let schema = tool.input_schema.clone();
    let pricing = Pricing::from_setting(&price.setting, price.default_charge, &schema)
        .map_err(|reason| CatalogError::BadPrice { tool: name.clone(), reason })?;
    let description = tool.description.as_deref().unwrap_or_default().to_owned();
    let quote =
        pricing.as_ref().map(|p| Arc::new(Quote::new(terms, &name, &description, &schema, p.floor())));
    if let (Some(quote), Some(pricing)) = (&quote, &pricing) {
        let (key, value) = quote.price_meta(pricing);
        let mut meta = serde_json::Map::new();
        meta.insert(key, value);
        tool = tool.with_meta(MetaObject(meta));
    }
    Ok(ToolEntry { tool, quote, pricing, source, validator, handler })
}

/// The catalog in service. Readers take a snapshot; a change replaces the whole catalog.
pub struct LiveCatalog {
    current: RwLock<Arc<Catalog>>,
    /// One change at a time, built outside the read path's lock.
    writer: std::sync::Mutex<()>,
    /// Upstreams that may still bring tools: until they do, a tool missing from the catalog
    /// may be one of theirs, not one that was withdrawn.
    pending_sources: std::sync::atomic::AtomicUsize,
}

impl LiveCatalog {
    pub fn new(catalog: Catalog, pending_sources: usize) -> LiveCatalog {
        LiveCatalog {
            current: RwLock::new(Arc::new(catalog)),
            writer: Default::default(),
            pending_sources: pending_sources.into(),
        }
    }

    /// Whether every source has listed its tools (no upstream is still to join).
    pub fn is_complete(&self) -> bool {
        self.pending_sources.load(std::sync::atomic::Ordering::SeqCst) == 0
    }

    /// A source that was pending has joined (or given up for good).
    pub fn source_settled(&self) {
        self.pending_sources.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
    }

    /// The catalog now; it stays whole for as long as the caller holds it.
    pub fn current(&self) -> Arc<Catalog> {
        self.current.read().expect("catalog lock").clone()
    }

    /// Applies `change` to a copy of the current catalog and swaps it in, unless it fails.
    /// The copy is built outside the lock readers take (compiling schemas takes a while).
    pub fn update<T, E>(&self, change: impl FnOnce(&mut Catalog) -> Result<T, E>) -> Result<T, E> {
        let _one = self.writer.lock().expect("catalog writer lock");
        let mut next = Catalog::clone(&self.current());
        let done = change(&mut next)?;
        *self.current.write().expect("catalog lock") = Arc::new(next);
        Ok(done)
    }
}
