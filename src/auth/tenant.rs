//! Tenant isolation: the one place that decides which municipalities a caller may see.

use std::convert::Infallible;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::Caller;

/// The tenants a request may read. Every admin read takes one and either passes
/// `query_filter()` to the journal (lists) or checks `allows()` (single records); a record of
/// another tenant is reported as not found, never as forbidden, so its existence does not leak.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantScope {
    /// No `[auth]` (loopback), or a caller whose tenant claim holds `"*"`.
    All,
    /// Only these municipality numbers; events without a tenant are not visible.
    Only(Vec<String>),
}

impl TenantScope {
    pub fn of(caller: Option<&Caller>) -> Self {
        match caller {
            None => TenantScope::All,
            Some(c) if c.tenants.iter().any(|t| t == "*") => TenantScope::All,
            Some(c) => TenantScope::Only(c.tenants.clone()),
        }
    }

    /// Whether a record of `tenant` is visible.
    pub fn allows(&self, tenant: Option<&str>) -> bool {
        match self {
            TenantScope::All => true,
            TenantScope::Only(list) => tenant.is_some_and(|t| list.iter().any(|x| x == t)),
        }
    }

    /// For journal queries: `None` = no restriction, `Some(list)` = tenant must be in list.
    pub fn query_filter(&self) -> Option<Vec<String>> {
        match self {
            TenantScope::All => None,
            TenantScope::Only(list) => Some(list.clone()),
        }
    }
}

impl<S: Send + Sync> FromRequestParts<S> for TenantScope {
    type Rejection = Infallible;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        Ok(TenantScope::of(parts.extensions.get::<Caller>()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn caller(t: &[&str]) -> Caller {
        Caller {
            sub: "s".into(),
            tenants: t.iter().map(|s| s.to_string()).collect(),
            scopes: vec![],
            may_see_patient: false,
        }
    }

    #[test]
    fn scope_rules() {
        assert_eq!(TenantScope::of(None), TenantScope::All);
        assert_eq!(TenantScope::of(Some(&caller(&["*"]))), TenantScope::All);
        let a = TenantScope::of(Some(&caller(&["0301"])));
        assert!(a.allows(Some("0301")));
        assert!(!a.allows(Some("4601")));
        assert!(!a.allows(None));
        assert_eq!(a.query_filter(), Some(vec!["0301".to_string()]));
        let none = TenantScope::of(Some(&caller(&[])));
        assert!(!none.allows(Some("0301")));
    }
}
