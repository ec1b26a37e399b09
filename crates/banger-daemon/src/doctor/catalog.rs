//! Checks of what VMs are made from: the catalog, and whether the default
//! image and kernel are registered or can be pulled from it.

use banger_proto::status::{Check, CheckStatus};

use super::{check, Doctor};

impl Doctor<'_> {
    pub(super) fn catalog_check(
        &self,
        catalog: &Result<Option<banger_catalog::Catalog>, crate::catalog::CatalogError>,
    ) -> Check {
        let url = &self.config.catalog.url;
        match catalog {
            Ok(None) => check(
                "catalog",
                CheckStatus::Ok,
                "none configured; images and kernels are imported".to_owned(),
                None,
            ),
            Ok(Some(catalog)) => check(
                "catalog",
                CheckStatus::Ok,
                format!(
                    "{url}: {} image(s), {} kernel(s)",
                    catalog.images.len(),
                    catalog.kernels.len()
                ),
                None,
            ),
            Err(error) => check(
                "catalog",
                CheckStatus::Fail,
                format!("{url} cannot be loaded: {}", crate::error::chain(error)),
                Some("check `[catalog] url` and that the host reaches it"),
            ),
        }
    }

    pub(super) fn default_artifact(
        &self,
        kind: &str,
        catalog: Option<&banger_catalog::Catalog>,
    ) -> Check {
        let (name, found, hint) = if kind == "image" {
            let name = &self.config.vm.image;
            (
                name,
                self.images.image(name).is_ok(),
                format!("`banger image import {name} FILE`"),
            )
        } else {
            let name = &self.config.vm.kernel;
            (
                name,
                self.images.kernel(name).is_ok(),
                format!("`banger kernel import {name} FILE`"),
            )
        };
        let label = format!("default {kind}");
        let in_catalog = catalog.is_some_and(|catalog| {
            if kind == "image" {
                catalog.image(name, None).is_some()
            } else {
                catalog.kernel(name, None).is_some()
            }
        });
        if !found && in_catalog {
            return check(
                &label,
                CheckStatus::Ok,
                format!("`{name}` is not local but is in the catalog (`vm create` pulls it)"),
                None,
            );
        }
        if found {
            check(
                &label,
                CheckStatus::Ok,
                format!("`{name}` is registered"),
                None,
            )
        } else {
            check(
                &label,
                CheckStatus::Warn,
                format!("`{name}` is not registered; `vm create` needs --{kind}"),
                Some(&hint),
            )
        }
    }
}
